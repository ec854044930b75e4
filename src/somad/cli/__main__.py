"""``python -m somad.cli``: the somad command line."""

import sys

from somad.cli import main

sys.exit(main())
