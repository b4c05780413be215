"""Fault-injection matrix: every place the tool writes a file, with a full disk (ENOSPC) and no permission
(EACCES), and a SIGKILL between the phases of a run.

A write fault is injected at the commit of the atomic write to one target (the patched `os.replace` of
fileio raises for targets that match the row's pattern, after the temporary file was written), in the
real command run in this process. Every row asserts: exit code 2, one line on stderr that starts with
"error:", no traceback; no temporary file left; every file in the output folder complete (each
safetensors loads, each PNG decodes, each JSON parses); and, with the disk freed (the same command run
again, --resume_from_checkpoint latest for training), the right result: for training, exactly the
adapter an uninterrupted run gives. A new write site is one row of WRITE_SITES.
"""

import errno
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from dreambooth_singlora import fileio

STEPS = 4


def train_argv(tiny_pipeline, dataset_dir, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(tiny_pipeline), "--subject", "dog", "--dataset_dir",
            dataset_dir, "--output_dir", str(out), "--resolution", "32", "--max_train_steps", str(STEPS),
            "--checkpointing_steps", "2", "--log_every", "2", "--report_to", "none", "--ramp_steps", "2", *extra]


#: (row, command, pattern of the target path that fails, relative to the row's folder)
WRITE_SITES = [
    ("checkpoint adapter", "train", "out/checkpoints/checkpoint-4.tmp/adapter_model.safetensors"),
    ("checkpoint optimizer", "train", "out/checkpoints/checkpoint-4.tmp/optimizer.safetensors"),
    ("checkpoint state", "train", "out/checkpoints/checkpoint-4.tmp/trainer_state.json"),
    ("adapter", "train", "out/adapter_model.safetensors"),
    ("adapter config", "train", "out/adapter_config.json"),
    ("model card", "train", "out/README.md"),
    ("loss curve", "train", "out/loss_curve.png"),
    ("train stats", "train", "out/train_stats.json"),
    ("class images", "train-prior", "out/class_images/class-00001.png"),
    ("validation grid", "train-validation", "out/validation/step-00002.png"),
    ("generated PNG", "generate", "images/*/1.png"),
    ("index.json", "generate", "images/index.json"),
    ("contact sheet", "generate", "images/contact_sheet.png"),
    ("export", "export", "dog.safetensors"),
    ("eval scores", "eval", "eval/scores.json"),
    ("eval report", "eval", "eval/report.md"),
]
ERRORS = {"ENOSPC": errno.ENOSPC, "EACCES": errno.EACCES}
# every site with a full disk; a refused write at one site per command (the errno only changes the message, which
# one function words for every site: fileio.write_error)
EACCES_ROWS = ("adapter", "class images", "validation grid", "generated PNG", "export", "eval scores")
FAULTS = [(*site, "ENOSPC") for site in WRITE_SITES] + [(*site, "EACCES") for site in WRITE_SITES
                                                         if site[0] in EACCES_ROWS]


@pytest.fixture(scope="module")
def made(tiny_pipeline, dataset_dir, tiny_eval_checkpoints, tmp_path_factory):
    """An uninterrupted training run (the reference), and what the later commands read."""
    from dreambooth_singlora.cli import main

    root = tmp_path_factory.mktemp("faults-ref")
    main(train_argv(tiny_pipeline, dataset_dir, root / "out"))
    return root


def command(kind, tiny_pipeline, dataset_dir, enc, made, work: Path) -> list[str]:
    if kind.startswith("train"):
        extra = {"train": [], "train-prior": ["--with_prior_preservation", "--num_class_images", "2",
                                               "--sample_batch_size", "2"],
                 "train-validation": ["--validation_prompt", "a sks dog", "--validation_steps", "2",
                                      "--num_validation_images", "1"]}[kind]
        return train_argv(tiny_pipeline, dataset_dir, work / "out", *extra)
    if kind == "generate":
        return ["generate", "--adapter", str(made / "out"), "--prompt", "a sks dog", "--num_images_per_prompt", "2",
                "--num_inference_steps", "2", "--height", "32", "--width", "32", "--output_dir", str(work / "images")]
    if kind == "export":
        return ["export", "--adapter", str(made / "out"), "--output", str(work / "dog.safetensors")]
    return ["eval", "score", "--images", str(made / "eval-images"), "--dataset_dir", dataset_dir, "--output",
            str(work / "eval"), "--clip_checkpoint", str(enc["clip_dir"]), "--dino_checkpoint", str(enc["dino_dir"])]


def all_complete(folder: Path, killed: bool = False) -> None:
    """No temporary file is left (after a SIGKILL, which no code can clean up after, a temporary name may
    stay: it is never read or counted), and every other file there is complete."""
    for p in folder.rglob("*"):
        if any(".tmp" in part for part in p.relative_to(folder).parts):
            assert killed, f"temporary file left: {p}"
            continue
        if p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".json":
            json.loads(p.read_text())


def fail_writes_to(monkeypatch, root: Path, pattern: str, code: int) -> list:
    real, hits = os.replace, []

    def replace(src, dst, *a, **k):
        if fnmatch.fnmatch(str(Path(dst).relative_to(root)) if str(dst).startswith(str(root)) else "", pattern):
            hits.append(dst)
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(fileio.os, "replace", replace)
    return hits


@pytest.mark.parametrize("row, kind, pattern, err", FAULTS, ids=[f"{f[0]}-{f[3]}" for f in FAULTS])
def test_write_fault_is_one_line_and_loses_nothing(row, kind, pattern, err, made, tiny_pipeline, dataset_dir,
                                                   tiny_eval_checkpoints, tmp_path, monkeypatch, capsys):
    from dreambooth_singlora.cli import main

    if kind == "eval" and not (made / "eval-images").is_dir():  # 2 of dog's prompts x 2 images, the layout generate writes
        from dreambooth_singlora.prompts import get_subject, slugify

        for prompt in get_subject("dog").eval_prompts()[:2]:
            for k in range(2):
                folder = made / "eval-images" / "dog" / slugify(prompt)
                folder.mkdir(parents=True, exist_ok=True)
                Image.open(Path(dataset_dir) / "dog" / f"0{k}.jpg").convert("RGB").resize((64, 64)).save(folder / f"{k}.png")
    argv = command(kind, tiny_pipeline, dataset_dir, tiny_eval_checkpoints, made, tmp_path)
    hits = fail_writes_to(monkeypatch, tmp_path, pattern, ERRORS[err])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err_text = capsys.readouterr().err
    assert hits, f"nothing was written to {pattern}"
    assert e.value.code == 2
    lines = [ln for ln in err_text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err_text, err_text[-2000:]
    assert ("disk full" if err == "ENOSPC" else "permission denied") in lines[0]
    all_complete(tmp_path)
    monkeypatch.undo()
    if err == "EACCES":
        return  # the rerun after a freed disk is the ENOSPC row's
    main(argv + (["--resume_from_checkpoint", "latest"] if kind.startswith("train") else []))  # the disk freed
    all_complete(tmp_path)
    if kind == "train":
        ref, ours = load_file(str(made / "out" / "adapter_model.safetensors")), \
            load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
        assert max((ref[k] - ours[k]).abs().max().item() for k in ref) == 0.0
    if kind == "generate":
        index = json.loads((tmp_path / "images" / "index.json").read_text())
        assert len(index["images"]) == 2 and all((tmp_path / "images" / i["file"]).is_file() for i in index["images"])


def test_disk_full_message_names_what_is_intact_and_how_to_go_on(made, tiny_pipeline, dataset_dir, tmp_path,
                                                                 monkeypatch, capsys):
    from dreambooth_singlora.cli import main

    fail_writes_to(monkeypatch, tmp_path, "out/checkpoints/checkpoint-4.tmp/*", errno.ENOSPC)
    with pytest.raises(SystemExit):
        main(train_argv(tiny_pipeline, dataset_dir, tmp_path / "out"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "disk full" in line and "GB free" in line and "checkpoint-4" in line
    assert "checkpoint-2 is intact" in line and "--resume_from_checkpoint latest" in line


@pytest.mark.parametrize("argv, message", [
    (["generate", "--adapter", "{made}/out", "--prompt", "x", "--height", "33", "--width", "32"], "multiple of 8"),
    (["export", "--adapter", "{made}/out", "--output", "{made}/out/adapter_model.safetensors"], "adapter's own file"),
    (["train", "--pretrained_model_name_or_path", "x", "--subject", "dog", "--dataset_dir", "{data}",
      "--output_dir", "{tmp}/file"], "is a file"),
    (["train", "--pretrained_model_name_or_path", "x", "--subject", "dog", "--dataset_dir", "{data}",
      "--output_dir", "{tmp}/ro/out"], "cannot write"),
    (["train", "--pretrained_model_name_or_path", "x", "--subject", "dog", "--dataset_dir", "{data}",
      "--output_dir", "{tmp}/tb", "--report_to", "tensorboard"], "logs is a file"),
    (["train", "--pretrained_model_name_or_path", "x", "--subject", "dog", "--dataset_dir", "{data}",
      "--output_dir", "{tmp}/prior", "--with_prior_preservation", "--class_data_dir", "{tmp}/file/classes"], "cannot write"),
], ids=["size", "export-over-adapter", "output-is-a-file", "read-only-output", "tensorboard-logs", "class-images"])
def test_environment_faults_found_before_any_model_loads(argv, message, made, dataset_dir, tmp_path, capsys,
                                                         monkeypatch):
    import dreambooth_singlora.train_dreambooth as T
    from dreambooth_singlora.cli import main

    if os.geteuid() == 0 and "ro" in "".join(argv):  # root writes anywhere: make the folder a file's child
        (tmp_path / "ro").write_text("a file, not a folder")
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
    (tmp_path / "file").write_text("x")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "logs").write_text("a file where tensorboard's folder goes")
    monkeypatch.setattr(T.Base, "load", lambda *a: pytest.fail("a model loaded before the check"))
    before = (made / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:
        main([a.format(made=made, data=dataset_dir, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert (made / "out" / "adapter_model.safetensors").read_bytes() == before


def test_export_of_a_folder_mixing_two_base_models_is_refused(made, tmp_path, capsys):
    from safetensors.torch import save_file

    from dreambooth_singlora.export import main

    mixed = tmp_path / "mixed"
    shutil.copytree(made / "out", mixed, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    tensors = load_file(str(mixed / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key][:-8]  # a layer from a narrower model
    save_file(tensors, str(mixed / "adapter_model.safetensors"))
    with pytest.raises(SystemExit) as e:
        main(["--adapter", str(mixed), "--output", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "two base models" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- SIGKILL between phases

KILL_POINTS = {  # row: (command, the function whose call kills the process, how often it must run first)
    "latent caching": ("train", "dreambooth_singlora.train_dreambooth:prepared", 1),  # the second photo
    "mid-checkpoint": ("train", "dreambooth_singlora.checkpoint:save_optimizer_state", 1),  # checkpoint-4
    "mid-adapter-save": ("train", "dreambooth_singlora.adapter:save_file", 2),  # after 2 checkpoints' adapters
    "mid-render": ("generate", "dreambooth_singlora.generate:write_png", 1),  # the second image
}


@pytest.mark.parametrize("row", list(KILL_POINTS))
def test_sigkill_between_phases_then_rerun_finishes_right(row, made, tiny_pipeline, dataset_dir,
                                                          tiny_eval_checkpoints, tmp_path):
    kind, target, after = KILL_POINTS[row]
    module, name = target.split(":")
    owner, _, attr = name.rpartition(".")
    driver = ("import os, signal, sys, importlib\n"
              f"m = importlib.import_module({module!r})\n"
              f"o = getattr(m, {owner!r}) if {owner!r} else m\n"
              f"real, n = getattr(o, {attr!r}), [0]\n"
              "def killer(*a, **k):\n"
              f"    n[0] += 1\n"
              f"    if n[0] > {after}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(*a, **k)\n"
              f"setattr(o, {attr!r}, killer)\n"
              "from dreambooth_singlora.cli import main\n"
              "main(sys.argv[1:])\n")
    argv = command(kind, tiny_pipeline, dataset_dir, tiny_eval_checkpoints, made, tmp_path)
    r = subprocess.run([sys.executable, "-c", driver, *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    all_complete(tmp_path, killed=True)
    from dreambooth_singlora.cli import main

    main(argv + (["--resume_from_checkpoint", "latest"] if kind == "train" else []))
    all_complete(tmp_path, killed=True)
    if kind == "train":
        ref, ours = load_file(str(made / "out" / "adapter_model.safetensors")), \
            load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
        assert max((ref[k] - ours[k]).abs().max().item() for k in ref) == 0.0
    else:
        assert len(json.loads((tmp_path / "images" / "index.json").read_text())["images"]) == 2
