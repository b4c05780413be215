"""`python -m dreambooth_singlora.eval` (`python -m eval` from a checkout): see cli.py."""

import sys

from .cli import main

sys.exit(main())
