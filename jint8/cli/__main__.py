"""`python -m jint8.cli COMMAND ...`: the `jint8` console script without the installed entry point."""

import sys

from jint8.cli import main

sys.exit(main())
