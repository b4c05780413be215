"""Training checkpoints: one format for every run, one save, load, commit, list and prune.

    <output_dir>/checkpoints/checkpoint-<step>/
        trainer_state.json      step, subjects, adapter settings, optimizer param groups, schedule, loss
                                histories, shared config; written last: its presence marks a complete checkpoint
        optimizer.safetensors   AdamW's tensors (never a pickle)
        adapter_model.safetensors + adapter_config.json   a group of one subject: the adapter, usable as is
        bank.safetensors        a group of several: every adapter tensor stacked over the subjects, (S, ...)

A checkpoint is written into `checkpoint-<step>.tmp/` and renamed into place. Replacing an existing `checkpoint-<step>`
goes through `checkpoint-<step>.replaced/`, which `list_checkpoints` counts as the checkpoint until the new one is
in place, so a kill at any moment leaves a complete checkpoint of that step. Checkpoints written before version 0.2
(a single subject's, with `history` and no `subjects`) read as a group of one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import read_adapter
from .errors import UserError
from .fileio import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
BANK_NAME = "bank.safetensors"
#: the adapter settings a checkpoint must share with the run that resumes it
ADAPTER_KEYS = ("method", "rank", "alpha", "target_modules", "init", "ramp_steps")


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(root, names: list[str] | None = None) -> list[Path]:
    """Complete checkpoint folders (of the group `names`, if given), oldest first: never a `.tmp` one; a
    `.replaced` one stands for its step while the folder replacing it is not complete."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.endswith(".replaced")):  # plain names first
        m = re.fullmatch(r"checkpoint-(\d+)(\.replaced)?", p.name)
        if m and int(m[1]) not in found and (p / STATE_NAME).is_file():
            found[int(m[1])] = p
    listed = [found[s] for s in sorted(found)]
    return listed if names is None else [p for p in listed if _holds(read_state(p), names)]


def save_optimizer_state(optimizer, folder: Path) -> dict:
    """Write the optimizer's tensors to <folder>/optimizer.safetensors (atomically); returns the rest
    (param_groups, and plain-number state such as bitsandbytes' int step) as JSON for trainer_state."""
    sd = optimizer.state_dict()
    flat = dict(_flatten(sd["state"]))  # "<param>.<key>[.<key>...]"
    bad = [k for k, v in flat.items() if not (torch.is_tensor(v) or isinstance(v, (int, float, bool, str, type(None))))]
    if bad:
        raise UserError(f"the optimizer's state holds {type(flat[bad[0]]).__name__} at {bad[0]}, which a checkpoint "
                        "cannot store without pickle; use AdamW (drop --use_8bit_adam) or report it")
    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in flat.items() if torch.is_tensor(v)}
    with atomic_path(folder / OPTIMIZER_NAME) as tmp:
        save_file(tensors, str(tmp))
    return {"param_groups": sd["param_groups"], "scalars": {k: v for k, v in flat.items() if not torch.is_tensor(v)}}


def _flatten(state: dict, prefix: str = ""):
    """(dotted key, value) of a nested state dict (per parameter; bitsandbytes nests its quantisation state)."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_optimizer_state(optimizer, folder: Path, saved: dict) -> None:
    """The inverse of save_optimizer_state (safetensors: no pickle is ever loaded)."""
    state: dict = {}
    for name, v in [*load_file(str(folder / OPTIMIZER_NAME)).items(), *saved.get("scalars", {}).items()]:
        i, *path, last = name.removeprefix("state.").split(".")  # "<param>.<key>[.<key>...]"
        node = state.setdefault(int(i), {})
        for k in path:
            node = node.setdefault(k, {})
        node[last] = v
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_checkpoint(output_dir, step: int, write_weights, optimizer, lr_scheduler, state: dict,
                    limit: int | None) -> Path:
    """Write checkpoint-<step> (weights by `write_weights(folder)`, optimizer, schedule and `state`), commit it and
    keep the newest `limit` (None: all). On any error the temporary folder is removed, earlier checkpoints intact."""
    tmp = checkpoint_root(output_dir) / f"checkpoint-{step}.tmp"
    schedule = {k: v for k, v in lr_scheduler.state_dict().items()
                if isinstance(v, (int, float, str, bool, list, type(None)))}  # what JSON holds
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_weights(tmp)
        write_json_atomic(tmp / STATE_NAME, {  # written last: its presence marks a complete checkpoint
            **state, "step": step, "optimizer": save_optimizer_state(optimizer, tmp), "lr_scheduler": schedule})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(tmp, tmp.with_name(f"checkpoint-{step}"), limit, state.get("subjects"))


def commit_checkpoint(tmp: Path, final: Path, limit: int | None, names: list[str] | None = None) -> Path:
    """Rename the complete folder `tmp` to `final` (an existing `final` is moved aside first and removed
    last, so some complete copy is always listed), then keep only the newest `limit` checkpoints (of the
    group `names`: another group's are not this group's to prune)."""
    old = final.with_name(final.name + ".replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    if limit:
        for stale in list_checkpoints(final.parent, names)[:-limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_checkpoints(output_dir, names: list[str]) -> None:
    """Remove the checkpoints of the group `names` (its adapters are written; another group reuses the steps)."""
    for p in list_checkpoints(checkpoint_root(output_dir), names):
        shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint, in today's form (pre-0.2: subjects = None, histories = {None: history})."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path} has no readable {STATE_NAME} ({e}); resume from an older "
                        "checkpoint folder or start a new --output_dir") from None
    if "subjects" not in state:
        state["subjects"], state["histories"] = None, {None: state.pop("history", [])}
    return state


def find_checkpoint(output_dir, resume: str, names: list[str], max_steps: int) -> Path | None:
    """The checkpoint --resume_from_checkpoint names for the group `names`: 'latest' is the newest one in
    <output_dir>/checkpoints that holds exactly these subjects at a step <= max_steps (None if there is
    none: start at step 0). A folder given by name serves the group it holds; the others take 'latest'."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise UserError(f"{path} is not a training checkpoint (no {STATE_NAME}); give a checkpoint-<step> "
                            "folder or 'latest'")
        state = read_state(path)
        if _holds(state, names):
            if state["step"] > max_steps:
                raise UserError(f"{path} is at step {state['step']}, past --max_train_steps {max_steps}")
            return path
    found = [p for p in list_checkpoints(checkpoint_root(output_dir), names) if read_state(p)["step"] <= max_steps]
    if not found:
        logger.info("no checkpoint of %s in %s: starting from step 0", ", ".join(names), checkpoint_root(output_dir))
    return found[-1] if found else None


def _holds(state: dict, names: list[str]) -> bool:
    return state["subjects"] == names or (state["subjects"] is None and len(names) == 1)


def load_checkpoint(path: Path, names: list[str], adapter_settings: dict, load_weights, optimizer,
                    lr_scheduler) -> tuple[int, dict]:
    """Restore weights (`load_weights(folder)`), optimizer and schedule from the checkpoint at `path`, after
    checking it holds the group `names` with the same adapter settings; returns (step, histories by name)."""
    state = read_state(path)
    if not _holds(state, names):
        raise UserError(f"checkpoint {path} holds subjects {state['subjects']}, this group is {names}: resume "
                        "with the same --subjects and --subjects_per_batch, or use 'latest'")
    saved = state.get("adapter") or read_adapter(path)[0]  # before 0.2 the settings were in the adapter only
    for key in ADAPTER_KEYS:
        if saved.get(key) != adapter_settings.get(key):
            raise UserError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, this run has "
                            f"{adapter_settings.get(key)!r}: resume with the same settings, or start over with "
                            "--overwrite or a new --output_dir")
    load_weights(path)
    try:
        load_optimizer_state(optimizer, path, state["optimizer"])
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint {path} has an unreadable optimizer state ({type(e).__name__}: {e}); resume "
                        "from an older checkpoint folder or start a new --output_dir") from None
    lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **state["lr_scheduler"]})
    histories = state["histories"]
    if None in histories:  # a pre-0.2 checkpoint: its one history is this group's one subject's
        histories = {names[0]: histories[None]}
    logger.info("resumed %s from %s at step %d", ", ".join(names), path, state["step"])
    return int(state["step"]), histories


def subject_adapter(checkpoint, subject: str, output_dir=None) -> Path:
    """Subject `subject`'s adapter at the checkpoint's step, as an adapter folder (what load_adapter, generate and
    eval read). A checkpoint of one subject holds its adapter as it is: that folder is returned. A checkpoint of
    a batched group holds every subject's tensors stacked in bank.safetensors, (S, ...), row i = subjects[i]
    under the names a single adapter's tensors have: row i is written to `output_dir` (required then) as
    adapter_model.safetensors + adapter_config.json (settings, step and base model from trainer_state.json, the
    subject's run record as "run"), each atomically. UserError if the checkpoint does not hold the subject."""
    from . import __version__
    from .adapter import FORMAT, saved_u
    from .config import CONFIG_NAME, WEIGHTS_NAME

    path = Path(checkpoint)
    state = read_state(path)
    names = state["subjects"]
    if names is not None and subject not in names:
        raise UserError(f"checkpoint {path} holds {', '.join(names)}, not {subject!r}")
    if (path / WEIGHTS_NAME).is_file():
        return path
    if not (path / BANK_NAME).is_file() or names is None:
        raise UserError(f"checkpoint {path} has neither {WEIGHTS_NAME} nor {BANK_NAME}: it is damaged")
    if output_dir is None:
        raise UserError(f"checkpoint {path} is a batched group's: give an output folder for {subject}'s adapter")
    row = names.index(subject)
    try:
        tensors = {k: v[row].contiguous() for k, v in load_file(str(path / BANK_NAME)).items()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint {path} has an unreadable {BANK_NAME} ({type(e).__name__}: {e})") from None
    meta = {"run": (state.get("runs") or {}).get(subject), "format": FORMAT, "version": __version__,
            **state["adapter"], "step": int(state["step"]),
            "base_model": (state.get("config") or {}).get("pretrained_model_name_or_path"), "shapes": None}
    meta["u"] = saved_u(meta)
    out = Path(output_dir)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", FORMAT: json.dumps(meta)})
    write_json_atomic(out / CONFIG_NAME, meta)
    return out
