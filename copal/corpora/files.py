"""Reading the raw files of the builtin domains, with one-line errors.

Every format module reads its files through these, so a missing package, a
broken gzip file or non-UTF-8 bytes read the same whichever domain they hit.
"""

import gzip
import zlib
from pathlib import Path

from copal.errors import InputError


def missing(name: str, path: Path, package: str) -> InputError:
    """The error for domain `name` when `path` is not there: install `package`."""
    return InputError(f"builtin:{name}: {path} not found; install the Debian package {package} "
                      f"(apt-get install {package})")


def read_gzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: not a valid gzip file ({error})") from None


def decode(data: bytes, source: object) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{source}: not UTF-8 text (bad byte at offset {error.start})") from None
