"""python -m densenet_fast.train [options]  (the same as `densenet-fast train`)."""

import sys

from .trainer import main

sys.exit(main())
