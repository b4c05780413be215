"""Files that never end half-written: write beside the target, fsync, then os.replace.

A kill or a full disk during a save leaves the previous good file in place (and at worst a
stray `*.tmp-<pid>-<thread>` beside it, which the next save overwrites and nothing ever reads).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import UserError, first_line

NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class WriteError(UserError):
    """A file could not be written (full disk, no permission, ...): `path`, `reason`, and `disk_full`."""

    def __init__(self, path: Path, reason: str, disk_full: bool):
        self.path, self.reason, self.disk_full = Path(path), reason, disk_full
        super().__init__(f"{self.what()} while writing {self.path}")

    def what(self) -> str:
        """'disk full (1.20 GB free)' or 'permission denied', for messages that name the file themselves."""
        if not self.disk_full:
            return self.reason
        try:
            free = shutil.disk_usage(next(p for p in (self.path, *self.path.parents) if p.exists())).free
            return f"disk full ({free / 2**30:.2f} GB free)"
        except (OSError, StopIteration):
            return "disk full"


def write_error(path, e: BaseException) -> WriteError:
    """The WriteError for an exception `e` raised while writing `path` (an OSError, or safetensors' error,
    which carries the OS's message as text)."""
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in NO_SPACE) or "No space left" in text or "Disk quota" in text
    reason = (e.strerror or text) if isinstance(e, OSError) else text
    return WriteError(getattr(e, "filename", None) or path, (reason or type(e).__name__).lower(), full)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` atomically. A write that fails
    (full disk, no permission) raises WriteError and leaves `path` as it was, with no temporary file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # unique per writer thread
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # a WriteError is neither
            raise write_error(path, e) from None
        raise
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    with suppress(OSError):  # the folder's fsync (not supported on every platform / filesystem)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable(folder) -> None:
    """UserError, before any work starts, unless `folder` can be made and written to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def check_base_model(src: str) -> None:
    """UserError at once, not after minutes of retries, for a base model that cannot be had: a local path that does
    not exist, or a hub id that is neither in the local cache nor reachable (HF_HUB_OFFLINE set, no network, or
    not on the hub). The hub is asked through huggingface_hub, so HF_ENDPOINT (a mirror), proxies (HTTPS_PROXY)
    and a token count as they do for the download itself."""
    path = Path(src)
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        if not path.expanduser().exists():
            raise UserError(f"base model folder {src} does not exist (give a local diffusers folder with "
                            "model_index.json, unet/, vae/, ... or a hub id such as "
                            "stable-diffusion-v1-5/stable-diffusion-v1-5)")
        return
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError

    with suppress(Exception):  # not cached: the hub client raises several types
        snapshot_download(src, local_files_only=True, allow_patterns=["model_index.json"])
        return  # in the local cache
    how = ("pass a local diffusers folder with --pretrained_model_name_or_path /path/to/stable-diffusion-v1-5 "
           "(e.g. one made by `huggingface-cli download` on a machine with network)")
    # the hub client's own switch (read at its import), or the variable set later in this process
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"HF_HUB_OFFLINE is set and {src} is not in the local cache: {how}, or unset HF_HUB_OFFLINE")
    hub = constants.ENDPOINT
    try:  # one request, no retries: a refused or unresolvable host answers at once, a silent one in 10 s
        HfApi(endpoint=hub).model_info(src, timeout=10)
    except RepositoryNotFoundError:
        raise UserError(f"{src} is not a model on the hub ({hub}) and not in the local cache: check the id (a private "
                        f"or gated model needs `huggingface-cli login`), or {how}") from None
    except HfHubHTTPError:
        return  # the hub answered (busy, rate-limited, ...): the download itself will retry or say what is wrong
    except Exception as e:  # connection refused, DNS, proxy, TLS, timeout: requests' or httpx's types
        reason = first_line(e)[:200]
        raise UserError(f"no network to the model hub ({hub}: {reason}) and {src} is not in the local cache: "
                        f"{how}") from None
