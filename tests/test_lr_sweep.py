"""experiments/lr_sweep.py end to end on the tiny pipeline with tiny random encoders: 2 methods x 2 learning
rates x 1 subject, 2 steps at 32 px, 1 prompt x 2 images of 2 inference steps. The trainer runs in this
process with the argv the script builds (tests/test_reproduce.py's table3_run runs the same stage functions
through real processes); rendering and scoring run in this process as the script runs them without --gpus."""

import json
import subprocess
from pathlib import Path

import pytest
from helpers import fresh_accelerate_state, load_script
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
METHODS, LRS, SUBJECT, IMAGES = ("singlora", "lora"), ("0.0001", "0.001"), "dog", 2


def load_sweep():
    return load_script("lr_sweep")


@pytest.fixture(scope="module")
def sweep_run(tiny_pipeline, dataset_dir, tiny_eval_checkpoints, tmp_path_factory):
    from dreambooth_singlora.train_dreambooth import main as train_main

    mod = load_sweep()
    work = tmp_path_factory.mktemp("sweep") / "work"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--dataset_dir", dataset_dir, "--work_dir",
            str(work), "--methods", *METHODS, "--learning_rates", *LRS, "--subjects", SUBJECT,
            "--max_train_steps", "2", "--resolution", "32", "--mixed_precision", "no", "--num_inference_steps", "2",
            "--max_prompts", "1", "--num_images_per_prompt", str(IMAGES), "--render_batch_size", "2",
            "--clip_checkpoint", str(tiny_eval_checkpoints["clip_dir"]),
            "--dino_checkpoint", str(tiny_eval_checkpoints["dino_dir"]), "--train_args", "--report_to", "none"]
    calls = []

    def in_process(cmd, env):
        assert cmd[1:3] == ["-m", mod.t3.MULTI_SUBJECT_TRAINER] and "--subjects" in cmd, cmd
        calls.append(cmd)
        with fresh_accelerate_state():
            train_main(cmd[3:])

    real = mod.t3.run_trainer
    mod.t3.run_trainer = in_process
    try:
        mod.main(argv)
    finally:
        mod.t3.run_trainer = real
    return work, argv, calls


def test_sweep_trains_one_run_per_method_and_lr_and_writes_its_table(sweep_run):
    work, _, calls = sweep_run
    assert len(calls) == len(METHODS) * len(LRS)  # one trainer run per (method, lr), all subjects in it
    for cmd in calls:
        name = Path(cmd[cmd.index("--output_dir") + 1]).name
        assert name == f"{cmd[cmd.index('--method') + 1]}_lr{float(cmd[cmd.index('--learning_rate') + 1]):.6g}"
    for m in METHODS:
        weights = [load_file(work / "adapters" / f"{m}_lr{lr}" / SUBJECT / "adapter_model.safetensors") for lr in LRS]
        meta = json.loads((work / "adapters" / f"{m}_lr{LRS[0]}" / SUBJECT / "adapter_config.json").read_text())
        assert meta["step"] == 2 and meta["method"] == m
        assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])  # the lr reached the trainer
        for lr in LRS:
            assert len(list((work / "images" / f"{m}_lr{lr}" / SUBJECT).glob("*/*.png"))) == IMAGES
    sweep = json.loads((work / "sweep.json").read_text())
    assert sweep["metrics"] == ["dino", "clip_i", "clip_t"]
    assert sorted((c["method"], c["learning_rate"]) for c in sweep["cells"]) == sorted(
        (m, float(lr)) for m in METHODS for lr in LRS)
    assert all(c[k]["n_subjects"] == 1 and -1 <= c[k]["mean"] <= 1 for c in sweep["cells"] for k in sweep["metrics"])
    md = (work / "sweep.md").read_text()
    assert "| method | lr 0.0001 | lr 0.001 |" in md and "| singlora |" in md and "| lora |" in md
    assert "Not a protocol run" in md and "learning rates: 0.0001 0.001" in md
    assert (work / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "report" / "report.md").is_file()


def test_sweep_rerun_with_nothing_to_do_starts_no_process(sweep_run, monkeypatch):
    work, argv, _ = sweep_run
    mod = load_sweep()
    table = (work / "sweep.md").read_text()
    scores = work / "eval" / f"lora_lr{LRS[1]}" / "scores.json"
    stamp = scores.stat().st_mtime_ns

    def nothing(*a, **k):
        raise AssertionError(f"a rerun with nothing to do started work: {a[0] if a else k}")

    import dreambooth_singlora.eval as ev
    import dreambooth_singlora.eval.cli as ev_cli

    monkeypatch.setattr(subprocess, "run", nothing)
    monkeypatch.setattr(subprocess, "Popen", nothing)
    monkeypatch.setattr(mod.t3, "run_trainer", nothing)
    monkeypatch.setattr(ev, "load_encoders", nothing)
    monkeypatch.setattr(ev_cli, "main", nothing)
    mod.main(argv)
    assert (work / "sweep.md").read_text() == table and scores.stat().st_mtime_ns == stamp


def test_sweep_rejects_learning_rates_that_share_a_folder():
    mod = load_sweep()
    with pytest.raises(Exception, match="same folder"):
        mod.sweep_runs(["lora"], [1e-4, 1.0000001e-4], 8, 0)
