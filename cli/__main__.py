"""`python -m cli`: the `copal` command."""

import sys

from cli import main

sys.exit(main())
