"""User-facing errors (bad input raises UserError; the CLI prints it as one line and exits 2) and what every
command's process does around its work."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import warnings
from contextlib import suppress


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be right."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (for one-line errors that
    quote a library's)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


#: OS errors that come from the machine (disk, permissions, paths), reported as one line like bad input
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                      errno.EEXIST, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _fail(line: str, code: int = 2) -> None:
    """Close the tqdm bars a failed run left open (so that `line` starts a line of its own), print `line`, exit."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        with suppress(Exception):  # a bar that cannot close must not hide the error
            bar.close()
    print(line, file=sys.stderr)
    raise SystemExit(code) from None


def quiet_libraries() -> None:
    """The project's own log lines at INFO; the libraries' at WARNING, less the known-harmless ones: open_clip's
    INFO lines, the deprecation of `torch_dtype` that diffusers' pipeline loader passes on. Called once, by
    every command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("dreambooth_singlora", "eval"):
        logging.getLogger(name).setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*should be kept in float32.*")


def observed() -> bool:
    """Whether a profiler, tracer or debugger runs in this process (python -m cProfile, coverage, pdb): it has
    work left once the command returns, so the command must not end the process itself."""
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: tools registered with sys.monitoring
    return sys.getprofile() is not None or sys.gettrace() is not None or \
        (monitoring is not None and any(monitoring.get_tool(i) for i in range(6)))


def end_process() -> None:
    """End the process at once, without the interpreter's and CUDA's teardown (1.3-1.5 s after a training run
    on an H200, docs/BENCHMARKS.md): for a command whose files are all written and closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cli_entry(main):
    """Wrap a CLI main(argv): UserError (and Ctrl-C) -> one line on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(argv=None, **kwargs):
        quiet_libraries()
        try:
            return main(argv, **kwargs)
        except UserError as e:
            _fail(f"error: {e}")
        except OSError as e:  # the machine's fault, not the code's: a folder that cannot be made, a full disk
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f" ({e.filename})" if e.filename else ""
            _fail(f"error: {(e.strerror or str(e)).lower()}{where}; nothing written before it was lost")
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper
