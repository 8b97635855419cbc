"""Prefect's API for a command's flows, started off the critical path.

Without PREFECT_API_URL, Prefect starts a temporary API server in a
subprocess the first time a flow needs it and waits for it to answer: seconds
idle on the step's critical path (docs/DESIGN-NOTES.md, "Process-wide settings").
`TemporaryApi` starts that same server in a thread as soon as a command knows it
will run a flow, so it boots while the command checks its inputs and imports the
pipeline; `ready()` joins it before the flow starts
(Prefect then finds it running and reuses it). With PREFECT_API_URL set — the
production setting — there is nothing to start.

`prefect_settings()` applies the project's Prefect settings (environment defaults,
the filter of the temporary server's lines); entry points call it before Prefect is
imported.

The server dies with the command, however it ends: Prefect stops it at exit, and
for a kill -9 its process asks Linux for a signal when the thread that started it
ends (PR_SET_PDEATHSIG); that thread lives as long as the command.
"""

import ctypes
import logging
import os
import signal
import subprocess
import threading
import types

class _WithoutTemporaryServerLines(logging.Filter):
    """Drops Prefect's 'Starting/Stopping temporary server on …' lines. The server starts
    in the background while the command checks its inputs, so they would land around a
    one-line input error (and, at exit, after it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "temporary server on http" not in record.getMessage()


_WITHOUT_SERVER_LINES = _WithoutTemporaryServerLines()


def prefect_settings() -> None:
    """This project's Prefect settings for the whole process: called once by an entry
    point (the command line's `main`, the test session, a benchmark) before Prefect is
    imported, since Prefect reads its settings from the environment when it is imported.
    Values already set in the environment win; calling it again changes nothing.

    copal's log lines go to the Prefect API with the flow's; no analytics; a busy 2-core
    machine may take longer than the 20 s default to start the temporary API."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "copal")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Prefect's subprocess-server logger is its root logger, "prefect"; its logging setup
    # (dictConfig) keeps a logger's filters. addFilter adds one filter once.
    logging.getLogger("prefect").addFilter(_WITHOUT_SERVER_LINES)


_THREAD = "prefect-temporary-api"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the server's process, before it runs: SIGTERM when the starting thread ends,
    and exit now if the parent already died in between."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


class _PopenDyingWithItsThread(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        if threading.current_thread().name == _THREAD:
            kwargs.setdefault("preexec_fn", _die_with_parent)
        super().__init__(*args, **kwargs)


class TemporaryApi:
    def __init__(self):
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._start, name=_THREAD, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                from prefect.server.api import server

                # Only the server's start goes through this Popen (and only from this thread).
                server.subprocess = types.SimpleNamespace(Popen=_PopenDyingWithItsThread,
                                                          TimeoutExpired=subprocess.TimeoutExpired)
                server.SubprocessASGIServer().start()
        except BaseException as error:  # re-raised in the caller's thread by ready()
            self._error = error
        self._done.set()
        threading.Event().wait()  # the server's parent-death signal fires when this thread ends

    def ready(self) -> None:
        """Wait until the server answers; raise what starting it raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
