"""Render and the Table-3 reproduction, end to end on the tiny pipeline with tiny random encoders
(2 subjects x 2 prompts x 4 images, 2 rows). Numbers from random encoders mean nothing; the plumbing is real."""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_singlora.eval.cli import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
ROWS, SUBJECTS, PROMPTS, IMAGES = ("lora_r8", "singlora_r8"), ("dog", "backpack"), 2, 4


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_table3", ROOT / "scripts" / "reproduce_table3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def table3_run(tiny_pipeline, dataset_dir, tiny_eval_checkpoints, tmp_path_factory):
    """One reproduction run for the whole session (its processes are the expensive part). Read-only for
    tests: a test that changes files works on a copy."""
    work = tmp_path_factory.mktemp("t3") / "work"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--dataset_dir", dataset_dir, "--work_dir",
            str(work), "--rows", *ROWS, "--subjects", *SUBJECTS, "--max_train_steps", "2", "--resolution", "32",
            "--num_inference_steps", "2", "--max_prompts", str(PROMPTS), "--num_images_per_prompt", str(IMAGES),
            "--clip_checkpoint", str(tiny_eval_checkpoints["clip_dir"]),
            "--dino_checkpoint", str(tiny_eval_checkpoints["dino_dir"]), "--multi_subject",
            "--train_args", "--report_to", "none"]
    load_script().main(argv)
    return work, argv


def test_table3_end_to_end(table3_run):
    work, _ = table3_run
    table = (work / "table3.md").read_text()
    assert "| lora_r8 |" in table and "| singlora_r8 |" in table and "0.677" in table  # ours beside the paper's
    for row in ROWS:
        for subject in SUBJECTS:
            meta = json.loads((work / "adapters" / row / subject / "adapter_config.json").read_text())
            assert meta["step"] == 2 and meta["method"] == row.split("_")[0]
            assert len(list((work / "images" / row / subject).glob("*/*.png"))) == PROMPTS * IMAGES
        scores = json.loads((work / "eval" / row / "scores.json").read_text())
        assert scores["summary"]["all"]["dino"]["n_images"] == len(SUBJECTS) * PROMPTS * IMAGES
    for f in ("report.md", "report.png", "report.html", "report.json"):
        assert (work / "report" / f).stat().st_size > 0


def test_table3_rerun_with_nothing_to_do_starts_no_process(table3_run, monkeypatch):
    """The same command again, every stage: no trainer, no accelerate, no encoder; finished files untouched."""
    work, argv = table3_run
    files = [work / "adapters" / "singlora_r8" / "dog" / "adapter_model.safetensors",
             next((work / "images" / "singlora_r8" / "dog").glob("*/0.png")),
             work / "eval" / "lora_r8" / "scores.json", work / "eval" / "singlora_r8" / "scores.json"]
    stamps = [f.stat().st_mtime_ns for f in files]
    table = (work / "table3.md").read_text()

    def no_process(*a, **k):
        raise AssertionError(f"a rerun with nothing to do started a process: {a[0] if a else k}")

    def no_encoder(*a, **k):
        raise AssertionError("a rerun with nothing to do loaded the encoders")

    import dreambooth_singlora.eval as ev

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(ev, "load_encoders", no_encoder)
    load_script().main(argv)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (work / "table3.md").read_text() == table  # the same scores read back, the same table


def test_render_todo_finds_every_kind_of_missing_image(table3_run, tmp_path):
    work, _ = table3_run
    mod = load_script()
    images = tmp_path / "images"
    shutil.copytree(work / "images" / "lora_r8", images)
    assert mod.render_todo(images, SUBJECTS, PROMPTS, IMAGES) == []
    assert mod.render_todo(images, SUBJECTS, PROMPTS + 1, IMAGES) == list(SUBJECTS)  # a prompt more
    assert mod.render_todo(images, SUBJECTS, PROMPTS, IMAGES + 1) == list(SUBJECTS)  # an image more
    next((images / "backpack").glob("*/3.png")).unlink()
    assert mod.render_todo(images, SUBJECTS, PROMPTS, IMAGES) == ["backpack"]
    (images / "dog" / "index.json").unlink()  # a subject interrupted before its index.json
    assert mod.render_todo(images, SUBJECTS, PROMPTS, IMAGES) == ["dog", "backpack"]


def test_scores_are_kept_only_while_current(table3_run, tmp_path):
    work, _ = table3_run
    mod = load_script()
    for part in ("images", "eval"):
        shutil.copytree(work / part / "lora_r8", tmp_path / part / "lora_r8")
    args = SimpleNamespace(work_dir=tmp_path, max_prompts=PROMPTS, num_images_per_prompt=IMAGES,
                           encoders=["clip", "dino"])
    assert mod.current_scores(args, "lora_r8", list(SUBJECTS))["scored"]["images"] == len(SUBJECTS) * PROMPTS * IMAGES
    assert mod.current_scores(args, "lora_r8", ["dog"]) is None  # other subjects
    assert mod.current_scores(SimpleNamespace(**{**vars(args), "encoders": ["clip"]}), "lora_r8", list(SUBJECTS)) is None
    assert mod.current_scores(SimpleNamespace(**{**vars(args), "max_prompts": 1}), "lora_r8", list(SUBJECTS)) is None
    scores = tmp_path / "eval" / "lora_r8" / "scores.json"
    index = tmp_path / "images" / "lora_r8" / "dog" / "index.json"
    later = scores.stat().st_mtime_ns + 10**9
    os.utime(index, ns=(later, later))  # the subject was rendered again after scoring
    assert mod.current_scores(args, "lora_r8", list(SUBJECTS)) is None


def test_multi_subject_trainer_is_one_command():
    """The multi-subject trainer call lives in one place and passes the trainer's own flags."""
    mod = load_script()
    args = SimpleNamespace(pretrained_model_name_or_path="base", dataset_dir="d", work_dir=Path("w"),
                           max_train_steps=3, resolution=32, seed=0, mixed_precision="no", train_args=["--x"])
    cmd = mod.multi_subject_train_command(args, "singlora_r8", ["dog", "cat"])
    assert cmd[1:5] == ["-m", mod.MULTI_SUBJECT_TRAINER, "--subjects", "dog"] and cmd[-1] == "--x"
    assert cmd[cmd.index("--method") + 1] == "singlora" and cmd[cmd.index("--rank") + 1] == "8"


def test_render_reports_missing_and_rejects_unknown(table3_run, tmp_path, capsys):
    work, _ = table3_run
    out = tmp_path / "imgs"
    eval_main(["render", "--adapters", str(work / "adapters" / "lora_r8"), "--output", str(out), "--subjects", "dog",
               "cat", "--max_prompts", "1", "--num_inference_steps", "1", "--num_images_per_prompt", "1"])
    assert "rendered 1 subjects" in capsys.readouterr().out and (out / "dog" / "index.json").is_file()
    with pytest.raises(SystemExit) as e:
        eval_main(["render", "--adapters", str(work / "adapters" / "lora_r8"), "--output", str(out), "--subjects",
                   "unicorn"])
    assert e.value.code == 2 and "unknown subject 'unicorn'" in capsys.readouterr().err


def test_render_rejects_zero_prompts(table3_run, tmp_path, capsys):
    work, _ = table3_run
    with pytest.raises(SystemExit) as e:
        eval_main(["render", "--adapters", str(work / "adapters" / "lora_r8"), "--output", str(tmp_path / "i"),
                   "--max_prompts", "0"])
    assert e.value.code == 2 and "--max_prompts must be >= 1" in capsys.readouterr().err
