"""Prefect's API for a command's flows, started off the critical path.

Without PREFECT_API_URL, Prefect starts a temporary API server in a
subprocess the first time a flow needs it and waits for it to answer: 6-13 s
on a 2-core machine (measured in benchmarks/pass_speed.py), idle on the step's
critical path. `TemporaryApi` starts that same server in a thread as soon as
a command knows it will run a flow, so it boots while the command checks its
inputs and imports the pipeline; `ready()` joins it before the flow starts
(Prefect then finds it running and reuses it). With PREFECT_API_URL set — the
production setting — there is nothing to start.
"""

import logging
import os
import threading

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "copal")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A busy 2-core machine can take longer than the 20 s default to start the temporary API.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


class _WithoutTemporaryServerLines(logging.Filter):
    """Drops Prefect's 'Starting/Stopping temporary server on …' lines. The server starts
    in the background while the command checks its inputs, so they would land around a
    one-line input error (and, at exit, after it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "temporary server on http" not in record.getMessage()


# Prefect's subprocess-server logger is its root logger, "prefect"; its logging setup
# (dictConfig) keeps a logger's filters.
logging.getLogger("prefect").addFilter(_WithoutTemporaryServerLines())


class TemporaryApi:
    def __init__(self):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="prefect-temporary-api", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                from prefect.server.api.server import SubprocessASGIServer

                SubprocessASGIServer().start()
        except BaseException as error:  # re-raised in the caller's thread by ready()
            self._error = error

    def ready(self) -> None:
        """Wait until the server answers; raise what starting it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
