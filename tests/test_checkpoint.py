"""The checkpoint module on its own: atomic commit (also over an existing checkpoint), listing, pruning."""

import json
import os
import shutil

import pytest
import torch

from dreambooth_singlora import checkpoint as C
from dreambooth_singlora.config import TrainConfig


def make(root, step, marker):
    """A fake committed checkpoint whose content says `marker`."""
    tmp = root / C.CHECKPOINTS / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # as save_checkpoint does: a killed save's folder is stale
    tmp.mkdir(parents=True)
    (tmp / "weights").write_text(marker)
    (tmp / C.STATE_NAME).write_text(json.dumps({"step": step}))
    return tmp


def test_replacing_a_checkpoint_is_atomic_at_every_point(tmp_path, monkeypatch):
    root = tmp_path / C.CHECKPOINTS
    C.commit_checkpoint(make(tmp_path, 4, "old"), root / "checkpoint-4", None)
    real, renames = os.rename, []

    def kill_after_first_rename(src, dst):  # the process dies between moving the old folder aside and the new in
        renames.append((src, dst))
        real(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(root), "rename", lambda self, dst: kill_after_first_rename(self, dst))
    with pytest.raises(KeyboardInterrupt):
        C.commit_checkpoint(make(tmp_path, 4, "new"), root / "checkpoint-4", None)
    monkeypatch.undo()
    found = C.list_checkpoints(root)  # the moved-aside old one still stands for step 4
    assert [p.name for p in found] == ["checkpoint-4.replaced"] and (found[0] / "weights").read_text() == "old"
    C.commit_checkpoint(make(tmp_path, 4, "newer"), root / "checkpoint-4", None)
    found = C.list_checkpoints(root)
    assert [p.name for p in found] == ["checkpoint-4"] and (found[0] / "weights").read_text() == "newer"
    assert not (root / "checkpoint-4.replaced").exists()


def test_incomplete_folders_are_never_listed_and_the_limit_prunes(tmp_path):
    root = tmp_path / C.CHECKPOINTS
    for step in (2, 4, 6):
        C.commit_checkpoint(make(tmp_path, step, str(step)), root / f"checkpoint-{step}", 2)
    make(tmp_path, 8, "half")  # a save that never got renamed
    (root / "checkpoint-10").mkdir()  # no trainer_state.json
    assert [p.name for p in C.list_checkpoints(root)] == ["checkpoint-4", "checkpoint-6"]


def test_a_failed_save_leaves_no_tmp_folder_and_earlier_checkpoints_intact(tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"subjects": ["dog"], "histories": {"dog": []}}
    C.save_checkpoint(tmp_path, 2, lambda f: (f / "w").write_text("ok"), opt, sched, state, None)

    def disk_full(folder):
        (folder / "w").write_text("par")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        C.save_checkpoint(tmp_path, 4, disk_full, opt, sched, state, None)
    root = tmp_path / C.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]
    assert (root / "checkpoint-2" / "w").read_text() == "ok"


@pytest.mark.parametrize("given, kept", [(None, 2), (0, None), (3, 3)])
def test_checkpoints_total_limit_zero_keeps_all(given, kept, tmp_path):
    kw = {} if given is None else {"checkpoints_total_limit": given}
    cfg = TrainConfig(pretrained_model_name_or_path="x", instance_data_dir=str(tmp_path), instance_prompt="a sks x",
                      **kw)
    assert cfg.checkpoints_total_limit == kept
