"""scripts/min_constraints.py: the pins that CI's min-versions job installs, read off pyproject.toml."""

from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, deps):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\ndependencies = [\n"
                                             + "".join(f"    {d!r},\n" for d in deps) + "]\n")
    return tmp_path / "pyproject.toml"


def test_every_dependency_of_the_project_has_a_floor_that_is_pinned():
    mc = load_script("min_constraints")
    pins = mc.floors(ROOT / "pyproject.toml")
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    # what the package imports (dreambooth_singlora/, eval/), each declared with a floor
    assert {"torch", "torchvision", "diffusers", "transformers", "accelerate", "open-clip-torch", "timm", "pillow",
            "safetensors", "peft", "huggingface-hub", "numpy", "psutil", "tqdm", "tensorboard", "matplotlib"} <= names
    assert all("==" in p and p.split("==")[1][0].isdigit() for p in pins)


def test_pins_the_floor_keeps_markers_and_refuses_a_missing_floor(tmp_path):
    mc = load_script("min_constraints")
    assert mc.floors(write(tmp_path, ["a>=1.2", "b-c[x] >= 0.3, <2", "d>=4; python_version < '3.12'"])) == [
        "a==1.2", "b-c==0.3", "d==4 ; python_version < '3.12'"]
    with pytest.raises(SystemExit, match="'e'"):
        mc.floors(write(tmp_path, ["a>=1", "e"]))
    with pytest.raises(SystemExit, match="f<2"):
        mc.floors(write(tmp_path, ["f<2"]))
