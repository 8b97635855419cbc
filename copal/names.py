"""The one rule for names a user chooses (domains, runs): safe as a file name, an
MLflow key or run name and a DVC path alike."""

import re

from copal.errors import InputError

NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_safe_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def safe_example(name: str) -> str:
    """A safe name close to `name` (for hints)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:64]
    return slug if is_safe_name(slug) else "domain1"


def check_name(name: str, what: str) -> str:
    if not is_safe_name(name):
        raise InputError(f"{what} {name[:80]!r}: not a valid name ({NAME_RULE})")
    return name
