"""Path safety for the web UI: every path a person types is checked before anything reads or writes it.

Inside the workspace (runs, jobs, images, exports) a typed path must be relative and stay inside after every
symlink is followed: `..`, an absolute path or a symlink that points out is refused with a UserError that says so.
The few inputs that name something outside (the base model, a dataset folder, encoder checkpoints) are read-only
references checked by `existing_reference`: they must exist, and nothing is ever written or served from them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from ..errors import UserError

#: run and job names: what becomes a folder name (no separators, no dot files, no spaces)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str = "run name") -> str:
    """A folder name typed into the UI (a run's name): letters, digits, '_', '-', '.', not starting with a dot."""
    name = (name or "").strip()
    if not NAME.match(name) or ".." in name:
        raise UserError(f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.' "
                        "(no '/', no '..', not starting with '.')")
    return name


def inside(root, typed, what: str = "path") -> Path:
    """`typed` (relative to `root`) as an absolute path that stays inside `root`; UserError for an absolute
    path, a `..` part, or a symlink anywhere along it that leads outside."""
    root = Path(root).resolve()
    text = str(typed or "").strip()
    if not text:
        raise UserError(f"{what} is empty: give a path inside the workspace {root}")
    if os.path.isabs(text) or text.startswith("~") or re.match(r"^[A-Za-z]:", text):
        raise UserError(f"{what} {text!r} is absolute: give a path relative to the workspace {root}")
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise UserError(f"{what} {text!r} leaves the workspace by '..': give a path inside {root}")
    path = (root / text).resolve()  # follows every symlink on the way
    if path != root and root not in path.parents:
        raise UserError(f"{what} {text!r} leads outside the workspace {root} (through a symlink): "
                        "give a path inside it")
    return path


def within(root, path) -> Path:
    """An absolute path the UI itself built (from listings) checked the same way: resolved, inside `root`."""
    root, p = Path(root).resolve(), Path(path).resolve()
    if p != root and root not in p.parents:
        raise UserError(f"{path} is outside the workspace {root}")
    return p


def existing_reference(typed, what: str, workspace=None) -> str:
    """A read-only input outside the workspace that the person names (base model folder or file, dataset folder,
    encoder checkpoint): absolute, or relative to the workspace; it must exist. Returned as an absolute path."""
    text = str(typed or "").strip()
    if not text:
        raise UserError(f"{what} is empty")
    p = Path(text).expanduser()
    if not p.is_absolute():
        if workspace is None:
            raise UserError(f"{what} {text!r} must be an absolute path")
        p = inside(workspace, text, what)
    if not p.exists():
        raise UserError(f"{what} {text} does not exist")
    return str(p.resolve())


def is_hub_id(text: str) -> bool:
    """'owner/name' that is not a local path: a model-hub id, passed to the trainer as it is."""
    text = str(text or "").strip()
    return bool(re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", text)) and not Path(text).exists() and ".." not in text
