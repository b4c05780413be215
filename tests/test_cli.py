"""The `dreambooth-singlora` entry point dispatches to each command's own CLI."""

import subprocess
import sys

import pytest

from dreambooth_singlora.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("command, flag", [("train", "--max_train_steps"), ("generate", "--adapter_scale"),
                                           ("export", "--format"), ("eval", "render"),
                                           ("train-multi", "--subjects"), ("generate-many", "--adapters")])
def test_each_command_reaches_its_parser(command, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and flag in capsys.readouterr().out


def test_installed_script_runs_export_with_bad_adapter(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dreambooth_singlora.cli", "export", "--adapter", str(tmp_path / "none"),
                        "--output", str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
