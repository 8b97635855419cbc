"""Where copal's shipped files are, and where run state goes by default.

Shipped files (the demo and bench configs, the reference model) sit at their
place in a source checkout; a wheel carries them as package data under
`copal/shipped/`, in the same layout (`shipped("configs/demo.yaml")` either way).

Run state (run directories, the MLflow store, the Arrow cache) goes under
$COPAL_HOME if set, else the working directory: never into site-packages.
"""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
# A source checkout (or an editable install of one) has its pyproject beside the package.
CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()


def shipped(relative: str) -> Path:
    """A file that ships with copal, by its path in the source tree."""
    return (PROJECT_ROOT if CHECKOUT else PACKAGE_DIR / "shipped") / relative


def state_home() -> Path:
    """The folder run state goes under by default: $COPAL_HOME, else the working directory."""
    return Path(os.environ.get("COPAL_HOME") or ".")
