"""Held-out photos: which of a subject's photos its adapter never trained on, and the scores against them.

The trainer's `--holdout K` keeps K of a subject's photos (chosen by the run's seed) out of training and records
their file names (inside the subject's photo folder) in the adapter's adapter_config.json:

    {"holdout": ["03.jpg", "05.jpg"], ...}          (or inside its "run" record; [] or absent: none held out)

`eval score` then scores every image metric (DINO, CLIP-I, the DINO patch diagnostic) three ways for such a
subject: against all its photos (the protocol's number, unchanged), against the photos it trained on
(`<metric>_train`) and against the held-out ones (`<metric>_heldout`), and reports their difference
(`<metric>_gap` = train - held-out, per image; its means are the differences of the means). A gap well
above the spread across subjects says the adapter copies its training photos more than it learned the
subject. Where the holdout comes from: --adapters (a folder of per-subject adapters, or one adapter
folder), else the adapter each subject's index.json names (what `eval render` and `generate-many` record).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dreambooth_singlora.config import CONFIG_NAME
from dreambooth_singlora.errors import UserError

SUFFIXES = ("train", "heldout", "gap")


def holdout_files(meta: dict) -> list[str]:
    """The held-out photo names an adapter config records (top level, or in its run record); [] for none."""
    names = meta.get("holdout")
    if names is None:
        names = (meta.get("run") or {}).get("holdout")
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"adapter config's \"holdout\" must be a list of file names, got {names!r}")
    return list(names)


def read_config(folder) -> Optional[dict]:
    """adapter_config.json of an adapter folder (None if there is none); the weights are not read."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e})") from None
    return meta if isinstance(meta, dict) else None


def holdouts_from_adapters(folders) -> dict:
    """{subject: held-out names} from adapter folders: each folder is one adapter (its subject: the run record's,
    else the folder's name) or holds one adapter folder per subject."""
    out = {}
    for folder in folders:
        folder = Path(folder)
        meta = read_config(folder)
        if meta is not None:
            out[(meta.get("run") or {}).get("subject") or folder.name] = holdout_files(meta)
            continue
        found = {}
        if folder.is_dir():
            for sub in sorted(folder.iterdir()):
                m = read_config(sub) if sub.is_dir() else None
                if m is not None:
                    found[sub.name] = holdout_files(m)
        if not found:
            raise UserError(f"--adapters {folder}: no {CONFIG_NAME} in it or in its subfolders (give the trainer's "
                            "--output_dir, or one subject's adapter folder)")
        out.update(found)
    return out


def holdouts_from_settings(settings: dict) -> dict:
    """{subject: held-out names} from the generation settings found in an images folder: each
    <subject>/index.json's "settings" names the adapter folder it was rendered from."""
    out = {}
    for rel, content in settings.items():
        parts = rel.split("/")
        if len(parts) != 2 or parts[1] != "index.json" or not isinstance(content, dict):
            continue
        adapter = (content.get("settings") or {}).get("adapter")
        meta = read_config(adapter) if adapter and Path(adapter).is_dir() else None
        if meta is not None:
            out[parts[0]] = holdout_files(meta)
    return out


def split(real_paths: list[str], names: list[str]):
    """(training indices, held-out indices, names not found) of a subject's real photos ('dog/03.jpg', ...)."""
    held = set(names)
    base = [Path(p).name for p in real_paths]
    train_idx = [i for i, b in enumerate(base) if b not in held]
    held_idx = [i for i, b in enumerate(base) if b in held]
    return train_idx, held_idx, sorted(held - set(base))


def metric_names(image_metrics) -> list[str]:
    return [f"{m}_{s}" for m in image_metrics for s in SUFFIXES]


def summary_cells(held: dict, group: str) -> list[str]:
    """'DINO train 0.71 held-out 0.64 gap +0.07' per image metric of a result's holdout section."""
    from .report import label

    cells = []
    for m in held["image_metrics"]:
        g = held["summary"][group]
        t, h, d = (g[f"{m}_{s}"]["mean"] for s in SUFFIXES)
        if t is not None:
            cells.append(f"{label(m)} train {t:.4f} held-out {h:.4f} gap {d:+.4f}")
    return cells
