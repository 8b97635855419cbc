"""The base of every configuration section: the run config's, each method's options
(copal.methods.*) and the bench grid's (copal.grid)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A section whose unknown keys are errors (a misspelt option never silently means
    its default) and whose values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
