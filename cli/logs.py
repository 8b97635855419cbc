"""Where the command line's log lines go: copal's through Rich on stderr, Prefect's
through its own handler but without the errors a command reports as one line, and
library chatter and download bars silenced."""

import logging
import os
import sys

from rich.logging import RichHandler

from cli.app import one_line
from cli.console import err, quiet_prefect
from copal.errors import EnvironmentFault, InputError


class WithoutInputErrors(logging.Filter):
    """Drops Prefect's reports of an error the command reports as one line (InputError,
    EnvironmentFault, a full disk), wherever it was raised: the failed task's and flow
    run's traceback, and the 'Finished in state Failed(... InputError: …)' lines that
    quote it."""

    _QUOTED = (f"{InputError.__name__}: ", f"{EnvironmentFault.__name__}: ", "[Errno 28]", "[Errno 122]")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and one_line(record.exc_info[1]):
            return False
        message = record.getMessage()
        return not any(quoted in message for quoted in self._QUOTED)


# The loggers Prefect's engines report flow and task runs on (and the one its engine crashes go to).
_PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine")
_filter = WithoutInputErrors()


def setup_logging(verbose: bool) -> None:
    """copal's own messages go to stderr through Rich; Prefect keeps its own handler
    (its lines name the task run) but not for input errors; library chatter and
    download bars are silenced."""
    for name in _PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(_filter)
    logger = logging.getLogger("copal")
    logger.handlers = [RichHandler(console=err, show_path=False, show_time=False)]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "mlflow", "alembic", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings, one per attempt
    quiet_prefect(verbose)
    # Hugging Face's download and loading bars off, without importing transformers here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported already (a test's process): tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
        sys.modules["transformers"].utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
