"""User-facing errors: bad input raises UserError; the CLI prints it as one line and exits 2."""

from __future__ import annotations

import functools
import logging
import sys


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be right."""


def cli_entry(main):
    """Wrap a CLI main(argv): UserError (and Ctrl-C) -> one line on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(argv=None):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
