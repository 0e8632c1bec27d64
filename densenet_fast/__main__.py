"""`python -m densenet_fast ...` runs the densenet-fast command line (densenet_fast/cli.py)."""

import sys

from .cli import main

sys.exit(main())
