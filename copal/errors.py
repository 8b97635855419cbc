"""The one error type that means "the user gave us bad input".

The command line turns it into a single line on stderr and exit code 2; every
other exception is a bug or an environment failure (exit code 1).
"""


class InputError(Exception):
    """Bad input or configuration: the message names the input and what is wrong."""
