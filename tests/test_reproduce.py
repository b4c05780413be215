"""Render and the Table-3 reproduction (`eval table3`, dreambooth_singlora.eval.table3), end to end on the tiny
pipeline with tiny random encoders (2 subjects x 2 prompts x 4 images, 2 rows: LoRA r8 named by --rows and an
ablation row of SingLoRA from a rows file; then a second seed added to a copy). Numbers from random encoders
mean nothing; the plumbing is real."""

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import fresh_accelerate_state

from dreambooth_singlora.eval.cli import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
# the ablation row: no ramp, all four projections (a rows-file row: trainer flags of its own)
ABLATION = dict(name="singlora_qkvo_noramp", method="singlora", rank=8, ramp_steps=0,
                target_modules=["to_q", "to_k", "to_v", "to_out.0"])
ROWS, SUBJECTS, PROMPTS, IMAGES = ("lora_r8", ABLATION["name"]), ("dog", "backpack"), 2, 4
SING = ABLATION["name"]


def load_table3():
    from dreambooth_singlora.eval import table3

    return table3


@pytest.fixture(scope="session")
def table3_run(tiny_pipeline, dataset_dir, tiny_eval_checkpoints, tmp_path_factory):
    """One reproduction run for the whole session (its processes are the expensive part). Read-only for
    tests: a test that changes files works on a copy."""
    work = tmp_path_factory.mktemp("t3") / "work"
    rows_file = work.parent / "rows.json"
    rows_file.write_text(json.dumps([ABLATION]))
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--dataset_dir", dataset_dir, "--work_dir",
            str(work), "--rows", "lora_r8", "--rows_file", str(rows_file), "--events", str(work.parent / "ev.jsonl"),
            "--subjects", *SUBJECTS, "--max_train_steps", "2", "--resolution", "32",
            "--num_inference_steps", "2", "--max_prompts", str(PROMPTS), "--num_images_per_prompt", str(IMAGES),
            "--clip_checkpoint", str(tiny_eval_checkpoints["clip_dir"]),
            "--dino_checkpoint", str(tiny_eval_checkpoints["dino_dir"]), "--multi_subject", "--mixed_precision", "no",
            "--train_args", "--report_to", "none"]
    load_table3().main(argv)
    return work, argv


def in_process_trainer(mod, calls):
    """Run the trainer command the script builds in this process (the same argv, without a process start:
    the subprocess path itself is what the session's table3_run exercises)."""
    from dreambooth_singlora.train_dreambooth import main as train_main

    def run(cmd, env):
        assert cmd[1:3] == ["-m", mod.MULTI_SUBJECT_TRAINER], cmd
        calls.append(cmd)
        with fresh_accelerate_state():
            train_main(cmd[3:])
    return run


def test_table3_end_to_end(table3_run):
    work, _ = table3_run
    table = (work / "table3.md").read_text()
    assert "| lora_r8 | 1 |" in table and f"| {SING} | 1 |" in table and "0.677" in table  # beside the paper's
    assert f"{SING} = singlora r8, ramp_steps 0, target_modules to_q to_k to_v to_out.0" in table
    meta = json.loads((work / "adapters" / SING / "dog" / "adapter_config.json").read_text())
    assert meta["ramp_steps"] == 0 and meta["target_modules"] == ABLATION["target_modules"]  # the row's flags
    stats = json.loads((work / "table3.json").read_text())
    assert stats["rows"][SING]["metrics"]["clip_i"]["difference"]["n"] == len(SUBJECTS)  # paired against LoRA r8
    assert stats["row_settings"][SING]["ramp_steps"] == 0
    events = [json.loads(line) for line in (work.parent / "ev.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "started" and events[-1]["event"] == "finished"
    assert {e.get("stage") for e in events if e["event"] == "progress"} == {"train", "render", "score"}
    assert "DINO patch (diag.)" in table and "about 0.15" in table and "Paired difference" in table
    assert "Not a protocol run" in table and "max_train_steps 2 (protocol: 400)" in table  # a toy run says so
    assert '"a photo of sks <class>"' in table and "400 optimizer steps" in table
    report = (work / "report" / "report.md").read_text()
    assert "Not a protocol run" in report and f"base model: {argv_value(table3_run[1], '--pretrained_model_name_or_path')}" in report
    assert '<img src="report.png"' in (work / "report" / "report.html").read_text()
    for row in ROWS:
        for subject in SUBJECTS:
            meta = json.loads((work / "adapters" / row / subject / "adapter_config.json").read_text())
            assert meta["step"] == 2 and meta["method"] == row.split("_")[0]
            assert len(list((work / "images" / row / subject).glob("*/*.png"))) == PROMPTS * IMAGES
        scores = json.loads((work / "eval" / row / "scores.json").read_text())
        assert scores["summary"]["all"]["dino"]["n_images"] == len(SUBJECTS) * PROMPTS * IMAGES
    for f in ("report.md", "report.png", "report.html", "report.json"):
        assert (work / "report" / f).stat().st_size > 0


def argv_value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_table3_rerun_with_nothing_to_do_starts_no_process(table3_run, monkeypatch):
    """The same command again, every stage: no trainer, no accelerate, no encoder; finished files untouched."""
    work, argv = table3_run
    files = [work / "adapters" / SING / "dog" / "adapter_model.safetensors",
             next((work / "images" / SING / "dog").glob("*/0.png")),
             work / "eval" / "lora_r8" / "scores.json", work / "eval" / SING / "scores.json"]
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
    load_table3().main(argv)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (work / "table3.md").read_text() == table  # the same scores read back, the same table


def test_render_todo_finds_every_kind_of_missing_image(table3_run, tmp_path):
    work, _ = table3_run
    mod = load_table3()
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
    mod = load_table3()
    for part in ("images", "eval"):
        shutil.copytree(work / part / "lora_r8", tmp_path / part / "lora_r8")
    args = SimpleNamespace(work_dir=tmp_path, max_prompts=PROMPTS, num_images_per_prompt=IMAGES,
                           encoders=["clip", "dino"], dino_patch_tokens=True)
    assert mod.current_scores(args, "lora_r8", list(SUBJECTS))["scored"]["images"] == len(SUBJECTS) * PROMPTS * IMAGES
    assert mod.current_scores(args, "lora_r8", ["dog"]) is None  # other subjects
    assert mod.current_scores(SimpleNamespace(**{**vars(args), "encoders": ["clip"]}), "lora_r8", list(SUBJECTS)) is None
    assert mod.current_scores(SimpleNamespace(**{**vars(args), "max_prompts": 1}), "lora_r8", list(SUBJECTS)) is None
    assert mod.current_scores(SimpleNamespace(**{**vars(args), "dino_patch_tokens": False}), "lora_r8",
                              list(SUBJECTS)) is None  # scored with the patch diagnostic, asked without
    scores = tmp_path / "eval" / "lora_r8" / "scores.json"
    index = tmp_path / "images" / "lora_r8" / "dog" / "index.json"
    later = scores.stat().st_mtime_ns + 10**9
    os.utime(index, ns=(later, later))  # the subject was rendered again after scoring
    assert mod.current_scores(args, "lora_r8", list(SUBJECTS)) is None


def test_multi_subject_trainer_is_one_command():
    """The multi-subject trainer call lives in one place and passes the trainer's own flags."""
    mod = load_table3()
    args = SimpleNamespace(pretrained_model_name_or_path="base", dataset_dir="d", work_dir=Path("w"),
                           max_train_steps=3, resolution=32, seed=0, mixed_precision="no", train_args=["--x"])
    run = mod.seed_runs(["singlora_r8"], 2)[1]
    cmd = mod.multi_subject_train_command(args, run, ["dog", "cat"])
    assert cmd[1:5] == ["-m", mod.MULTI_SUBJECT_TRAINER, "--subjects", "dog"] and cmd[-1] == "--x"
    assert cmd[cmd.index("--method") + 1] == "singlora" and cmd[cmd.index("--rank") + 1] == "8"
    assert cmd[cmd.index("--seed") + 1] == "1" and cmd[cmd.index("--output_dir") + 1] == str(
        Path("w") / "adapters" / "singlora_r8_seed1")
    dora = mod.multi_subject_train_command(args, mod.seed_runs(["dora_r8"], 1)[0], ["dog", "cat"])
    assert dora[dora.index("--subjects_per_batch") + 1] == "1"  # DoRA does not bank: one at a time


def test_more_seeds_extend_a_one_seed_work_dir(table3_run, tmp_path, monkeypatch):
    """--seeds 2 on a copy of the one-seed work dir: seed 0 is reused as it is (the one-seed layout), only
    the seed-1 runs train (one trainer command per run, --seed 1) and render; the table gets the paired
    differences with intervals over the 2 subjects."""
    work, argv = table3_run
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    mod = load_table3()
    calls = []
    monkeypatch.setattr(mod, "run_trainer", in_process_trainer(mod, calls))
    kept = [copy / "adapters" / "lora_r8" / "dog" / "adapter_model.safetensors", copy / "eval" / "lora_r8" / "scores.json"]
    stamps = [f.stat().st_mtime_ns for f in kept]
    argv = [*argv[:argv.index("--train_args")], "--seeds", "2", *argv[argv.index("--train_args"):]]
    argv[argv.index("--work_dir") + 1] = str(copy)
    mod.main(argv)
    assert sorted(c[c.index("--output_dir") + 1] for c in calls) == [
        str(copy / "adapters" / f"{r}_seed1") for r in ROWS]
    assert all(c[c.index("--seed") + 1] == "1" for c in calls) and [f.stat().st_mtime_ns for f in kept] == stamps
    for row in ROWS:
        assert len(list((copy / "images" / f"{row}_seed1" / "dog").glob("*/*.png"))) == PROMPTS * IMAGES
    stats = json.loads((copy / "table3.json").read_text())["rows"]
    assert stats["lora_r8"]["seeds"] == [0, 1] and stats["lora_r8"]["metrics"]["dino"]["difference"] is None
    diff = stats[SING]["metrics"]["clip_i"]["difference"]
    assert diff["n"] == len(SUBJECTS) and diff["low"] <= diff["mean"] <= diff["high"]
    assert stats[SING]["metrics"]["dino"]["std_seeds"] is not None
    table = (copy / "table3.md").read_text()
    assert f"| {SING} | 2 |" in table and "seeds: 0, 1" in table


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
