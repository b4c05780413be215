"""python -m eval: see eval/cli.py."""

import sys

from .cli import main

sys.exit(main())
