"""``python -m somad.cli``: the somad command line."""

import sys

from . import main

sys.exit(main())
