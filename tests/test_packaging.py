"""Packaging: the data ship inside the package, the evaluation code installs as dreambooth_singlora.eval,
and a built wheel holds no top-level module but dreambooth_singlora (issue 12)."""

import importlib
import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dreambooth_singlora import prompts as P

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "dreambooth_singlora", "eval", "prompts")  # what the wheel is built from


def test_subjects_and_prompts_are_package_data(monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_SINGLORA_PROMPTS", raising=False)
    data = importlib.resources.files(P.DATA_PACKAGE)
    for name in ("subjects.csv", "object.txt", "live.txt"):
        assert data.joinpath(name).is_file()
    assert P.prompts_dir() == Path(str(data))
    assert len(P.subjects()) == 30 and P.get_subject("dog").live and not P.get_subject("backpack").live
    assert len(P.prompt_templates("object")) == len(P.prompt_templates("live")) == 25
    assert P.get_subject("dog").eval_prompts()[0].count("sks dog") == 1


def test_prompts_folder_override(tmp_path, monkeypatch):
    (tmp_path / "subjects.csv").write_text("subject,class,kind\nmydog,dog,live\n")
    (tmp_path / "live.txt").write_text("a {} on the moon\n\n")
    monkeypatch.setenv("DREAMBOOTH_SINGLORA_PROMPTS", str(tmp_path))
    assert P.prompts_dir() == tmp_path and list(P.subjects()) == ["mydog"]
    assert P.get_subject("mydog").eval_prompts() == ["a sks dog on the moon"]


def test_eval_is_a_subpackage_and_the_cli_uses_it():
    import dreambooth_singlora.eval as ev
    import dreambooth_singlora.eval.cli as eval_cli
    from dreambooth_singlora.cli import COMMANDS

    assert ev.__name__ == "dreambooth_singlora.eval" and callable(ev.score_folder)
    assert importlib.import_module(COMMANDS["eval"][0]) is eval_cli  # one module object, the installed name
    assert Path(ev.__file__).resolve().parent == (ROOT / "eval").resolve()  # the eval/ folder, mapped


def test_installed_name_runs_outside_the_checkout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dreambooth_singlora.eval", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: dreambooth-singlora eval") and "score" in r.stdout


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The project's wheel, built once from a copy of its sources with the installed setuptools (no
    network, no build isolation, nothing written into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("dreambooth_singlora-*.whl")
    return whl


def test_wheel_has_only_the_project_at_top_level(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"dreambooth_singlora"} and len(dist_info) == 1
    for name in ("subjects.csv", "object.txt", "live.txt", "__init__.py"):
        assert f"dreambooth_singlora/benchmark_data/{name}" in names
    for module in ("__init__", "__main__", "cli", "score", "report", "encoders", "metrics", "render", "testing"):
        assert f"dreambooth_singlora/eval/{module}.py" in names
    assert "dreambooth-singlora = dreambooth_singlora.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)
