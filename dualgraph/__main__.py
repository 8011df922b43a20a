"""``python -m dualgraph``: the same command line as ``dualgraph``."""

import sys

from .cli import main

sys.exit(main())
