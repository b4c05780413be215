"""Files written by version 0.1.0 (tests/legacy, made by tests/legacy/make_legacy.py at commit db8577c) still
load and resume with today's code.

Tolerance of the comparisons with the legacy run: today's loss sums the same squared errors in another
order (one mean over a subject-major batch, not F.mse_loss), a float32 rounding difference of ~1e-7 of the
loss; two more AdamW steps carry it on, but they cannot turn the update around. A wrong optimizer state,
schedule, step or ramp changes the last two steps' update by the order of itself, so the resumed adapter
must match the legacy one to 1e-2 of the change those two steps made.
"""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dreambooth_singlora import load_adapter
from dreambooth_singlora.adapter import adapter_state
from dreambooth_singlora.checkpoint import list_checkpoints
from dreambooth_singlora.config import TrainConfig
from dreambooth_singlora.export import to_standard_lora
from dreambooth_singlora.train_dreambooth import train

LEGACY = Path(__file__).resolve().parent / "legacy"


def settings(tiny_pipeline, dataset_dir, out, **kw):
    """The settings make_legacy.py trained with."""
    return TrainConfig(**{**dict(pretrained_model_name_or_path=str(tiny_pipeline), dataset_dir=dataset_dir,
                                 resolution=32, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=0,
                                 log_every=2, report_to="none", ramp_steps=3, rank=2, lr_scheduler="cosine",
                                 lr_warmup_steps=1, mixed_precision="no", output_dir=str(out),
                                 resume_from_checkpoint="latest"), **kw})


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_legacy_adapter_loads_and_exports(tiny_unet):
    config = load_adapter(tiny_unet, LEGACY / "adapter")
    meta = json.loads((LEGACY / "adapter" / "adapter_config.json").read_text())
    assert config.rank == 2 and meta["step"] == 4 and adapter_state(tiny_unet).u == meta["u"] == 1.0
    tensors, _ = to_standard_lora(LEGACY / "adapter", "kohya")
    assert len(tensors) == 3 * len(weights(LEGACY / "adapter"))  # down, up, alpha per adapted projection


def test_legacy_single_subject_checkpoint_resumes(tiny_pipeline, dataset_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(LEGACY / "single-checkpoint-2", out / "checkpoints" / "checkpoint-2")
    train(settings(tiny_pipeline, dataset_dir, out, subject="dog"))
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps_run"] == 2 and [h[0] for h in stats["loss_history"]] == [2, 4]  # its history came along
    ours, legacy, start = weights(out), weights(LEGACY / "adapter"), weights(LEGACY / "single-checkpoint-2")
    change = max((legacy[k] - start[k]).abs().max().item() for k in legacy)
    assert change > 0 and max((ours[k] - legacy[k]).abs().max().item() for k in legacy) < 1e-2 * change


def test_legacy_bank_checkpoint_resumes(tiny_pipeline, dataset_dir, tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    shutil.copytree(LEGACY / "bank-checkpoint-2", out / "checkpoints" / "checkpoint-2")
    train(settings(tiny_pipeline, dataset_dir, out, subjects=["dog", "cat"]))
    train(settings(tiny_pipeline, dataset_dir, ref, subjects=["dog", "cat"], resume_from_checkpoint=None))
    start = load_file(str(LEGACY / "bank-checkpoint-2" / "bank.safetensors"))
    for i, s in enumerate(("dog", "cat")):
        assert json.loads((out / s / "train_stats.json").read_text())["steps_run"] == 2
        ours, uninterrupted = weights(out / s), weights(ref / s)
        change = max((uninterrupted[k] - start[k][i]).abs().max().item() for k in ours)
        assert change > 0 and max((ours[k] - uninterrupted[k]).abs().max().item() for k in ours) < 1e-2 * change
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]


def test_legacy_checkpoint_with_other_settings_is_refused(tiny_pipeline, dataset_dir, tmp_path, capsys):
    from dreambooth_singlora.train_dreambooth import main

    out = tmp_path / "run"
    shutil.copytree(LEGACY / "single-checkpoint-2", out / "checkpoints" / "checkpoint-2")
    with pytest.raises(SystemExit) as e:
        main(["--pretrained_model_name_or_path", str(tiny_pipeline), "--subject", "dog", "--dataset_dir", dataset_dir,
              "--output_dir", str(out), "--rank", "4", "--resolution", "32", "--report_to", "none",
              "--resume_from_checkpoint", "latest", "--max_train_steps", "4"])
    assert e.value.code == 2 and "rank=2" in capsys.readouterr().err


def test_legacy_checkpoint_named_for_several_subjects_is_refused(tiny_pipeline, dataset_dir, tmp_path):
    """A 0.1 checkpoint names no subject: given by path to a run of several subjects, it would fit each one."""
    from dreambooth_singlora import UserError

    with pytest.raises(UserError, match="0.1 checkpoint of one unnamed subject"):
        train(settings(tiny_pipeline, dataset_dir, tmp_path / "run", subjects=["dog", "cat"], subjects_per_batch=1,
                       resume_from_checkpoint=str(LEGACY / "single-checkpoint-2")))
