"""The two error types a command reports as one line.

`InputError`: the user gave bad input (exit code 2). `EnvironmentFault`: the
machine cannot do what was asked (disk full, …; exit code 1). Every other
exception is a bug (exit code 1, with its traceback).
"""

import errno


class InputError(Exception):
    """Bad input or configuration: the message names the input and what is wrong."""


class EnvironmentFault(Exception):
    """The environment failed (no space left, …): the message names where and what."""


# OSErrors that say what the machine refuses, not what the code got wrong.
_ENVIRONMENT = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def as_fault(error: BaseException) -> EnvironmentFault | None:
    """An OSError that means a full disk or a refused write, as one line; None otherwise."""
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT:
        where = error.filename or "disk"
        return EnvironmentFault(f"{where}: {(error.strerror or 'refused').lower()}")
    return None
