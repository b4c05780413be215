"""A new user's first hour: the README's quickstart as written, `dreambooth-singlora demo`, and `--help`
that answers without importing torch."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[list[str]]:
    """The commands of README.md's Quickstart code block, in order (continuation lines joined)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [ln.split("#", 1)[0].rstrip() for ln in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(ln) for ln in lines if ln.strip()]


def test_readme_quickstart_runs_in_order(tiny_pipeline, dataset_dir, tiny_eval_checkpoints, tmp_path, monkeypatch):
    """Each step reads what the step before wrote. Only the sizes change: the tiny model, 32 px, 2 steps."""
    from dreambooth_singlora.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = {"train": ["--resolution", "32", "--max_train_steps", "2", "--report_to", "none"],
            "generate": ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--batch_size", "50"],
            "export": [],
            "eval": ["--clip_checkpoint", str(tiny_eval_checkpoints["clip_dir"]),
                     "--dino_checkpoint", str(tiny_eval_checkpoints["dino_dir"])]}
    commands = quickstart_commands()
    assert [c[0] for c in commands][:2] == ["accelerate", "dreambooth-singlora"]
    for cmd in commands:
        if cmd[:2] == ["accelerate", "launch"]:  # one process: the module's own command
            assert cmd[2:4] == ["-m", "dreambooth_singlora.train_dreambooth"]
            cmd = ["train", *cmd[4:]]
        else:
            assert cmd[0] == "dreambooth-singlora"
            cmd = cmd[1:]
        cmd = [{"stable-diffusion-v1-5/stable-diffusion-v1-5": str(tiny_pipeline), "dreambooth/dataset": dataset_dir,
                "bf16": "no"}.get(a, a) for a in cmd]
        main(cmd + tiny[cmd[0]])
    runs = tmp_path / "runs" / "dog"
    assert json.loads((runs / "adapter" / "adapter_config.json").read_text())["step"] == 2
    assert len(json.loads((runs / "images" / "dog" / "index.json").read_text())["images"]) == 100
    assert (runs / "dog_singlora.safetensors").is_file()
    scores = json.loads((runs / "eval" / "scores.json").read_text())
    assert scores["overall"]["all"]["n_images"] == 100 if "overall" in scores else scores


@pytest.mark.parametrize("family, folder, kohya", [("sd1", "dog", "sd_v1"), ("sdxl", "dog-sdxl", "sdxl_base_v1-0")])
def test_demo_end_to_end(family, folder, kohya, tmp_path, capsys):
    from safetensors import safe_open

    from dreambooth_singlora.cli import main

    main(["demo", "--output", str(tmp_path / "demo"), "--steps", "2", "--family", family])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "noise" in out
    dog = tmp_path / "demo" / folder
    meta = json.loads((dog / "adapter" / "adapter_config.json").read_text())
    assert (meta["step"], meta["family"]) == (2, family)
    assert (dog / "images" / "dog" / "contact_sheet.png").is_file() and (dog / "dog_kohya.safetensors").is_file()
    with safe_open(str(dog / "dog_kohya.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == kohya
    assert (dog / "eval" / "scores.json").is_file() and (dog / "eval" / "report.html").is_file()


def test_demo_names_every_family_and_refuses_others(tmp_path, capsys):
    from dreambooth_singlora.base import FAMILIES
    from dreambooth_singlora.cli import main
    from dreambooth_singlora.demo import build_parser

    assert all(f"{k} (" in build_parser().format_help() for k in FAMILIES)  # its help lists them without torch
    with pytest.raises(SystemExit) as e:
        main(["demo", "--output", str(tmp_path / "demo"), "--family", "flux"])
    assert e.value.code == 2 and "unknown --family 'flux': give one of sd1, sd2, sdxl" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # refused before anything is written


COMMANDS = ["train", "train-multi", "generate", "generate-many", "export", "eval", "demo"]


def test_help_of_every_command_imports_no_torch():
    """Checked in a fresh process through sys.modules, not with a timer."""
    code = ("import sys\nfrom dreambooth_singlora.cli import main\nheavy = []\n"
            f"for c in {COMMANDS!r}:\n"
            "    try:\n        main([c, '--help'])\n    except SystemExit as e:\n        assert e.code in (0, None), c\n"
            "    if 'torch' in sys.modules:\n        heavy.append(c)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HEAVY []" in r.stderr, r.stderr[-500:]
    assert "(default: 400)" in r.stdout  # --help shows the defaults


@pytest.mark.parametrize("command, old, new", [
    ("generate", "--output_dir", "--output"), ("export", "--output", "--output_dir"),
    ("train", "--output_dir", "--output"), ("generate-many", "--output_dir", "--output"),
])
def test_one_output_flag_name_on_every_command(command, old, new):
    """`--output` works on every command; each command's earlier name still works."""
    from dreambooth_singlora import cli

    module, _, function = cli.HELP[command].partition(":")
    import importlib

    parser = getattr(importlib.import_module(module), function)()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {old, new} <= flags
