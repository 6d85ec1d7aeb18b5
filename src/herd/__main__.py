"""`python -m herd`: the herd command line."""

import sys

from .cli import main

sys.exit(main())
