"""Render and the Table-3 reproduction, end to end on the tiny pipeline with tiny random encoders
(2 subjects x 2 prompts x 4 images, 2 rows). Numbers from random encoders mean nothing; the plumbing is real."""

import importlib.util
import json
from pathlib import Path

import pytest

from eval.cli import main as eval_main
from eval.testing import save_tiny_clip, save_tiny_dino

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_table3", ROOT / "scripts" / "reproduce_table3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def table3_run(tiny_pipeline, dataset_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t3")
    clip, dino = save_tiny_clip(tmp / "clip"), save_tiny_dino(tmp / "dino")
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--dataset_dir", dataset_dir, "--work_dir",
            str(tmp / "work"), "--rows", "lora_r8", "singlora_r8", "--subjects", "dog", "backpack",
            "--max_train_steps", "2", "--resolution", "32", "--num_inference_steps", "2", "--max_prompts", "2",
            "--clip_checkpoint", str(clip), "--dino_checkpoint", str(dino), "--multi_subject",
            "--train_args", "--report_to", "none"]
    load_script().main(argv)
    return tmp / "work", argv


def test_table3_end_to_end(table3_run):
    work, _ = table3_run
    table = (work / "table3.md").read_text()
    assert "| lora_r8 |" in table and "| singlora_r8 |" in table and "0.677" in table  # ours beside the paper's
    for row in ("lora_r8", "singlora_r8"):
        for subject in ("dog", "backpack"):
            meta = json.loads((work / "adapters" / row / subject / "adapter_config.json").read_text())
            assert meta["step"] == 2 and meta["method"] == row.split("_")[0]
            assert len(list((work / "images" / row / subject).glob("*/*.png"))) == 2 * 4
        scores = json.loads((work / "eval" / row / "scores.json").read_text())
        assert scores["summary"]["all"]["dino"]["n_images"] == 2 * 2 * 4
    for f in ("report.md", "report.png", "report.html", "report.json"):
        assert (work / "report" / f).stat().st_size > 0


def test_table3_rerun_keeps_finished_work(table3_run):
    work, argv = table3_run
    adapter = work / "adapters" / "singlora_r8" / "dog" / "adapter_model.safetensors"
    image = next((work / "images" / "singlora_r8" / "dog").glob("*/0.png"))
    stamps = adapter.stat().st_mtime_ns, image.stat().st_mtime_ns
    load_script().main(argv[:argv.index("--train_args")] + ["--stages", "train", "render"])
    assert (adapter.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps


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
