"""The Typer app every command registers on, the `command` decorator that turns
errors into exit codes, and the options several commands share.

Exit codes: 0 success, 2 bad input or configuration (one line on stderr, no
traceback), 1 anything else. Only heavy-free modules are imported here (no torch,
no transformers), so `copal --help` and an input error answer in about a second.
"""

from functools import wraps
from typing import Annotated, Optional

import typer
import typer.core

from cli.console import err
from copal.errors import EnvironmentFault, InputError, as_fault

# Plain help (click's formatter): paragraphs rewrapped to the terminal, an option's
# metavar (DIR, N, URI) instead of its Python type.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Continual pruning of causal language models (COPAL and its baselines), "
                       "every step recorded so it can be audited, replayed and rolled back.")
# An argument is named by its metavar (CONFIG, DATA, GGUF); typer would add its Python type.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None


def note(text: str) -> None:
    """A line on stderr as it is: no Rich markup or highlighting, never wrapped."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    note(f"copal: error: {message}")
    raise typer.Exit(code)


def command(function):
    """Register a command whose InputErrors become exit code 2 with one line, and whose
    environment faults (EnvironmentFault, a full disk) exit code 1 with one line."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except InputError as error:
            fail(str(error))
        except EnvironmentFault as error:
            fail(str(error), 1)
        except OSError as error:
            fault = as_fault(error)
            if fault is None:
                raise
            fail(str(fault), 1)

    # The command list shows each command's first paragraph whole (click would cut it at 45 characters).
    summary = " ".join((function.__doc__ or "").split("\n\n")[0].split())
    return app.command(short_help=summary)(wrapper)


def one_line(error: BaseException | None) -> bool:
    """Whether the command reports `error` itself, as one line."""
    return isinstance(error, (InputError, EnvironmentFault)) or (error is not None and as_fault(error) is not None)


TrackingUri = Annotated[Optional[str], typer.Option(
    metavar="URI", help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///…/mlflow.db in "
                        "$COPAL_HOME or the working directory.")]


TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow running the model's own code "
                                                                          "when the run's config.yaml asks for it "
                                                                          "(trust_remote_code: true).")]

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug lines, and Prefect's own log lines "
                                                              "(flow and task runs), on stderr.")]
