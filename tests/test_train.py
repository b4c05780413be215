"""The DreamBooth trainer end to end on a tiny random-weight pipeline (CPU, a few steps)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_singlora import UserError, load_adapter
from dreambooth_singlora.config import TrainConfig
from dreambooth_singlora.data import load_images, to_rgb
from dreambooth_singlora.checkpoint import list_checkpoints
from dreambooth_singlora.train_dreambooth import main, train
from helpers import fresh_accelerate_state, killed_run, noise_schedule

STEPS = 12


def cfg_for(tiny_pipeline, dataset_dir, out, **kw):
    base = dict(pretrained_model_name_or_path=str(tiny_pipeline), subject="dog", dataset_dir=dataset_dir,
                output_dir=str(out), resolution=32, max_train_steps=STEPS, checkpointing_steps=4, log_every=2,
                random_flip=True, report_to="none", ramp_steps=6)
    return TrainConfig(**{**base, **kw})


def cli_args(cfg: TrainConfig, **extra):
    args = []
    for k, v in {**cfg.to_dict(), **extra}.items():
        if v is None or k in ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir"):
            continue
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, list):
            args += [f"--{k}", *map(str, v)]
        else:
            args += [f"--{k}", str(v)]
    return args


def max_diff(a_dir, b_dir):
    a, b = load_file(str(Path(a_dir) / "adapter_model.safetensors")), load_file(str(Path(b_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference_run(tiny_pipeline, dataset_dir, tmp_path_factory):
    """An uninterrupted 12-step run, in process."""
    out = tmp_path_factory.mktemp("ref")
    train(cfg_for(tiny_pipeline, dataset_dir, out, report_to="tensorboard"))
    return out


def test_run_writes_adapter_card_curve_logs(reference_run, tiny_unet):
    out = reference_run
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["step"] == STEPS and meta["u"] == 1.0 and meta["method"] == "singlora"
    for f in ("README.md", "loss_curve.png"):
        assert (out / f).stat().st_size > 0
    assert "dreambooth_singlora.generate" in (out / "README.md").read_text()
    assert list((out / "logs").rglob("events.out.tfevents*")), "tensorboard logs"
    # checkpoints: at most 2 kept, the newest at the last step
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-8", "checkpoint-12"]
    # the adapter learned something and loads back
    a = load_file(str(out / "adapter_model.safetensors"))
    assert len(a) == 7 * 2 * 2  # 7 transformer blocks (2 down, 1 mid, 4 up) x (attn1, attn2) x (to_q, to_k)
    config = load_adapter(tiny_unet, out)
    assert config.rank == 8


def test_same_seed_same_adapter_and_seed_matters(reference_run, tiny_pipeline, dataset_dir, tmp_path):
    again = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "again"))
    assert max_diff(reference_run, again) == 0.0
    other = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "other", seed=1, max_train_steps=4))
    ref4 = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "ref4", max_train_steps=4))
    assert max_diff(other, ref4) > 0


def test_sigkill_then_resume_latest_equals_uninterrupted(tiny_pipeline, dataset_dir, tmp_path):
    """A real SIGKILL of the CLI in the middle of step 5 of 8, with a cosine schedule after 3 warm-up steps;
    --resume_from_checkpoint latest ends with exactly the adapter of the uninterrupted run. Tolerance: exact
    (0.0) - the data of step t is a function of (seed, t), and the adapter, AdamW's state and the schedule's
    state are restored. (Kills at the other phases of a run: tests/test_faults.py.)"""
    kw = dict(checkpointing_steps=2, max_train_steps=8, lr_scheduler="cosine", lr_warmup_steps=3, learning_rate=1e-2,
              checkpoints_total_limit=0)
    assert killed_run(cli_args(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "killed", **kw)), 5, tmp_path) \
        == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    resumed = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "killed", resume_from_checkpoint="latest", **kw))
    assert json.loads((resumed / "train_stats.json").read_text())["steps_run"] == 4
    ref = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "ref", **kw))
    assert max_diff(ref, resumed) == 0.0
    state = json.loads((ref / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert 0 < state["lr_scheduler"]["_last_lr"][0] < 1e-2  # past the warm-up, on the cosine


def test_resume_a_checkpoint_of_another_process_count_keeps_the_schedule(tiny_pipeline, dataset_dir, tmp_path):
    """accelerate steps a prepared schedule once per process and step, so a checkpoint of a 2-process run holds
    its schedule at twice the step. Made here by doubling a 1-process checkpoint's count (the data and
    gradients of two processes would differ anyway): resumed on one process, it must give exactly the adapter
    of the uninterrupted run (cosine after 3 warm-up steps; read at step 8 of 8 the lr would be 0)."""
    kw = dict(checkpointing_steps=4, max_train_steps=8, lr_scheduler="cosine", lr_warmup_steps=3, learning_rate=1e-2,
              checkpoints_total_limit=0)
    ref = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "ref", **kw))
    shutil.copytree(ref / "checkpoints" / "checkpoint-4", tmp_path / "two" / "checkpoints" / "checkpoint-4")
    state_file = tmp_path / "two" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["lr_scheduler"]["last_epoch"] == 4
    state["lr_scheduler"]["last_epoch"] = 8  # what 2 processes write at step 4
    state_file.write_text(json.dumps(state))
    resumed = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "two", resume_from_checkpoint="latest", **kw))
    assert json.loads((resumed / "train_stats.json").read_text())["steps_run"] == 4
    assert max_diff(ref, resumed) == 0.0


def test_accelerate_launch_subprocess(tiny_pipeline, dataset_dir, tmp_path):
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path / "launched", max_train_steps=3, method="lora")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dreambooth_singlora.train_dreambooth",
           *cli_args(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "launched" / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["step"] == 3


def test_two_processes_data_parallel_in_bf16(tiny_pipeline, dataset_dir, tmp_path):
    """Two real processes (torchrun on the CPU: DDP over gloo), bf16 without autocast and the fast exit, the
    defaults: DDP runs the UNet as prepare_unet leaves it (the validation render fails if accelerate's fp32-output
    wrapper stays on), every process ends with status 0 once the main process has written the adapter, and the
    stats count both processes."""
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path / "ddp", max_train_steps=4, mixed_precision="bf16",
                  validation_prompt="a photo of sks dog", validation_steps=4, num_validation_images=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dreambooth_singlora.train_dreambooth", *cli_args(cfg)]
    loopback = {"GLOO_SOCKET_IFNAME": "lo"} if "lo" in {n for _, n in socket.if_nameindex()} else {}  # not the
    # address the host name resolves to, which a container may not reach
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **loopback})
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, err[-3000:]
    assert err.count("instance images") == 1 and err.count("adapter(s) of dog saved") == 1  # once, not per process
    assert (tmp_path / "ddp" / "validation" / "step-00004.png").stat().st_size > 0  # rendered on the main process
    stats = json.loads((tmp_path / "ddp" / "train_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["steps_run"] == 4 and len(stats["loss_history"]) == 2
    assert json.loads((tmp_path / "ddp" / "adapter_config.json").read_text())["step"] == 4
    tensors = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert len(tensors) == 28 and all(torch.isfinite(v).all() for v in tensors.values())


@pytest.mark.parametrize("fast_exit, how", [(True, "cli"), (True, "cProfile"), (False, "module")])  # the module's
# own `-m` path with the fast exit, what `accelerate launch -m` runs, is test_accelerate_launch_subprocess's
def test_the_command_ends_its_process_once_every_file_is_written(fast_exit, how, tiny_pipeline, dataset_dir,
                                                                 tmp_path):
    """Run as a command (`python -m dreambooth_singlora.train_dreambooth`, or `dreambooth-singlora train`
    through the CLI's dispatcher; here through runpy), the trainer ends its process with os._exit once its
    results are written (--fast_exit, the default): the interpreter's teardown, an atexit handler among it,
    does not run, and nothing is lost: the exit status is 0, the adapter and train_stats.json are complete.
    Under a profiler (python -m cProfile) it returns, so that the profile gets written; --no-fast_exit ends
    the usual way."""
    marker, profile = tmp_path / "atexit-ran", tmp_path / "train.prof"
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path / "out", max_train_steps=2, fast_exit=fast_exit)
    module, command = ("dreambooth_singlora.cli", ["train"]) if how == "cli" else \
        ("dreambooth_singlora.train_dreambooth", [])
    driver = ("import atexit, runpy\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
              f"runpy.run_module({module!r}, run_name='__main__')\n")
    cmd = ["-m", "cProfile", "-o", str(profile), "-m", module] if how == "cProfile" else ["-c", driver]
    r = subprocess.run([sys.executable, *cmd, *command, *cli_args(cfg)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    if how == "cProfile":
        assert profile.stat().st_size > 0  # written by cProfile after the command returned
    else:
        assert marker.exists() is not fast_exit
    assert "adapter(s) of dog saved" in r.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["step"] == 2
    assert len(load_file(str(tmp_path / "out" / "adapter_model.safetensors"))) == 28
    assert json.loads((tmp_path / "out" / "train_stats.json").read_text())["steps_run"] == 2


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="elsewhere since_start() falls back to psutil")
def test_phase_times_count_from_the_start_of_the_process():
    """since_start() (the phases of train_stats.json) is the age of the process: no less than what the process
    itself timed since its first line, no more than the parent saw pass since it started the process. Bounds:
    10 ms for the kernel's tick and 20 ms for rounding and the clocks' reads (psutil's create_time, used
    before, adds the boot time in whole seconds and can be up to a second off either way)."""
    code = ("import time; t0 = time.time()\n"
            "from dreambooth_singlora.train_dreambooth import since_start\n"
            "time.sleep(0.3); print(since_start(), time.time() - t0, time.time())")
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    age, own, end = map(float, out.split())
    assert own - 0.03 <= age <= end - before + 0.03, (age, own, end - before)


def test_save_failure_keeps_last_good_checkpoint(tiny_pipeline, dataset_dir, tmp_path, monkeypatch):
    """A full disk during a checkpoint save: the error surfaces, the previous checkpoint stays complete."""
    import errno

    import dreambooth_singlora.train_dreambooth as T

    real, calls = T.save_adapter, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: the disk fills up mid-write
            Path(a[1]).mkdir(parents=True, exist_ok=True)
            (Path(a[1]) / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(T, "save_adapter", flaky)
    with pytest.raises(UserError, match=r"disk full .*while writing checkpoint-8.*checkpoint-4 is intact.*"
                                        r"--resume_from_checkpoint latest"):
        train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "full"))
    done = list_checkpoints(tmp_path / "full" / "checkpoints")
    assert [p.name for p in done] == ["checkpoint-4"]
    monkeypatch.setattr(T, "save_adapter", real)
    out = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "full", resume_from_checkpoint="latest"))
    assert json.loads((out / "adapter_config.json").read_text())["step"] == STEPS


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tiny_pipeline, dataset_dir, tmp_path, monkeypatch):
    import dreambooth_singlora.train_dreambooth as T

    real, n = T.group_losses, [0]

    def nan_after_5(*a, **k):
        n[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if n[0] > 5 else loss

    monkeypatch.setattr(T, "group_losses", nan_after_5)
    with pytest.raises(UserError, match="non-finite.*checkpoint-4"):
        train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "nan"))
    done = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [p.name for p in done] == ["checkpoint-4"]
    assert all(torch.isfinite(t).all() for t in load_file(str(done[0] / "adapter_model.safetensors")).values())
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()


def test_prior_preservation_generates_class_images_once(tiny_pipeline, dataset_dir, tmp_path):
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path / "prior", with_prior_preservation=True,
                  num_class_images=3, max_train_steps=2, sample_batch_size=2)
    train(cfg)
    class_dir = tmp_path / "prior" / "class_images"
    made = sorted(class_dir.glob("*.png"))
    assert len(made) == 3
    stamps = [p.stat().st_mtime_ns for p in made]
    train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "prior", with_prior_preservation=True, num_class_images=3,
                  max_train_steps=2, output_dir=str(tmp_path / "prior2"), class_data_dir=str(class_dir)))
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps  # reused, not redone


# --------------------------------------------------------------------------- images of every kind

def make_odd_images(folder: Path) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.full((30, 30), 32896, np.uint16)).save(folder / "gray16.png")  # mid-gray, 16 bit
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:5, :7]).save(folder / "tiny.png")
    Image.fromarray(np.zeros((3000, 4500, 3), np.uint8)).save(folder / "huge.jpg", quality=50)
    good = (folder / "cmyk.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return {"usable": 7, "bad": ["corrupt.png", "empty.jpg", "truncated.jpg"]}


def test_images_of_every_kind_load_right(tmp_path, caplog):
    expect = make_odd_images(tmp_path / "odd")
    images, paths = load_images(tmp_path / "odd")
    assert len(images) == expect["usable"] and all(im.mode == "RGB" for im in images)
    for bad in expect["bad"]:
        assert bad in caplog.text
    assert "notes.txt" not in caplog.text and all(p.suffix != ".txt" for p in paths)
    by_name = dict(zip([p.name for p in paths], images))
    assert by_name["rotated.jpg"].size == (40, 60)  # EXIF orientation applied
    assert np.asarray(by_name["rgba.png"]).min() == 255  # transparent -> white
    assert abs(int(np.asarray(by_name["gray16.png"]).mean()) - 128) <= 1  # scaled, not clipped to 255
    assert to_rgb(Image.new("CMYK", (4, 4))).mode == "RGB"


def test_trains_on_odd_images(tiny_pipeline, tmp_path):
    make_odd_images(tmp_path / "odd")
    out = train(TrainConfig(pretrained_model_name_or_path=str(tiny_pipeline), instance_data_dir=str(tmp_path / "odd"),
                            instance_prompt="a photo of sks thing", output_dir=str(tmp_path / "o"), resolution=32,
                            max_train_steps=2, report_to="none"))
    assert json.loads((out / "adapter_config.json").read_text())["step"] == 2


# --------------------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("args, message", [
    (["--instance_data_dir", "{tmp}/missing", "--instance_prompt", "a sks dog"], "does not exist"),
    (["--instance_data_dir", "{tmp}/empty", "--instance_prompt", "a sks dog"], "has no image files"),
    (["--instance_data_dir", "{tmp}/broken", "--instance_prompt", "a sks dog"], "no usable image"),
    (["--subject", "unicorn", "--dataset_dir", "{tmp}"], "unknown subject 'unicorn'"),
    (["--subject", "dog"], "needs --dataset_dir"),
    (["--instance_data_dir", "{tmp}/empty"], "--instance_prompt is required"),
    (["--subject", "dog", "--dataset_dir", "{tmp}", "--resolution", "500"], "multiple of 8"),
    (["--instance_data_dir", "{tmp}/empty", "--instance_prompt", "x", "--with_prior_preservation"], "needs --class_prompt"),
    (["--subject", "dog", "--dataset_dir", "{tmp}", "--method", "adalora"], "invalid choice"),
    (["--subject", "dog", "--dataset_dir", "{tmp}", "--rank", "0"], "rank must be a positive integer"),
])
def test_bad_input_one_line_nonzero_exit(args, message, tiny_pipeline, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"junk")
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--output_dir", str(tmp_path / "o"),
            "--report_to", "none", *[a.format(tmp=tmp_path) for a in args]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_bad_base_model_is_one_line_in_a_real_process(tmp_path, dataset_dir):
    r = subprocess.run([sys.executable, "-m", "dreambooth_singlora.train_dreambooth", "--pretrained_model_name_or_path",
                        str(tmp_path / "nope"), "--subject", "dog", "--dataset_dir", dataset_dir, "--output_dir",
                        str(tmp_path / "o"), "--report_to", "none"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "base model folder" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("model, message", [
    ("{tmp}/empty-folder", "cannot load base model"),  # exists, but is no diffusers folder
    ("someone/not-cached-model", "HF_HUB_OFFLINE is set and someone/not-cached-model is not in the local cache"),
])
def test_unusable_base_model_fails_at_once(model, message, tiny_pipeline, dataset_dir, tmp_path, capsys, monkeypatch):
    """Offline, a hub id that is not cached fails before anything loads (no minutes of retries), naming the fix."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--pretrained_model_name_or_path", model.format(tmp=tmp_path), "--subject", "dog", "--dataset_dir",
              dataset_dir, "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in line and ("--pretrained_model_name_or_path" in line or "cannot" in line)


def test_a_run_reads_the_base_family_once(tiny_pipeline, dataset_dir, tmp_path, monkeypatch):
    """detect_family runs once, before any photo (for a hub id each run asks the hub for model_index.json):
    Base.load is handed what it found. (The default resolution still reads the UNet's and VAE's configs.)"""
    import dreambooth_singlora.base as base_module
    import dreambooth_singlora.train_dreambooth as trainer

    calls, real = [], base_module.detect_family
    counted = lambda *a, **k: calls.append(a[0]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(base_module, "detect_family", counted)
    monkeypatch.setattr(trainer, "detect_family", counted)
    with fresh_accelerate_state():
        train(cfg_for(tiny_pipeline, dataset_dir, tmp_path, max_train_steps=1, checkpointing_steps=1))
    assert calls == [str(tiny_pipeline)]


# --------------------------------------------------------------------------- optimizer state, checkpoints

def test_loraplus_keeps_weight_decay_and_ratio(tiny_unet, tiny_pipeline, dataset_dir, tmp_path):
    from dreambooth_singlora import add_adapter
    from dreambooth_singlora.train_dreambooth import make_optimizer

    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path, method="loraplus", adam_weight_decay=0.03)
    add_adapter(tiny_unet, cfg.adapter_config())
    groups = [g for g in make_optimizer(cfg, tiny_unet, torch.device("cpu")).param_groups if g["params"]]
    assert {g["weight_decay"] for g in groups} == {0.03}
    assert sorted({g["lr"] for g in groups}) == [cfg.learning_rate, cfg.learning_rate * cfg.loraplus_lr_ratio]


def test_optimizer_state_round_trip_keeps_plain_number_and_nested_state(tmp_path):
    """bitsandbytes keeps an int 'step' and, in current versions, a nested dict of quantisation state
    (tensors and numbers) per parameter: all of it must survive a checkpoint (safetensors + JSON)."""
    from dreambooth_singlora.checkpoint import load_optimizer_state, save_optimizer_state

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["int_step"] = 7
    opt.state[p]["__bnb_optimizer_quant_state__"] = {"state1": torch.arange(4.0), "absmax1": torch.ones(2),
                                                     "blocksize": 256}
    saved = json.loads(json.dumps(save_optimizer_state(opt, tmp_path)))
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    load_optimizer_state(opt2, tmp_path, saved)
    assert opt2.state[q]["int_step"] == 7 and opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    nested = opt2.state[q]["__bnb_optimizer_quant_state__"]
    assert torch.equal(nested["state1"], torch.arange(4.0)) and nested["blocksize"] == 256


def test_incomplete_or_corrupt_checkpoint(reference_run, tiny_pipeline, dataset_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "checkpoint-12"
    (newest / "trainer_state.json").unlink()  # a save that never finished
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-8"]
    (out / "checkpoints" / "checkpoint-8" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable optimizer state"):
        train(cfg_for(tiny_pipeline, dataset_dir, out, resume_from_checkpoint="latest"))


def test_subject_with_own_photos_says_which_photos_and_prompt(tiny_pipeline, dataset_dir, tmp_path, caplog):
    """--subject dog --instance_data_dir mine/: the photos of mine/ with dog's prompt, said in so many words."""
    out = train(cfg_for(tiny_pipeline, dataset_dir, tmp_path / "o", instance_data_dir=str(Path(dataset_dir) / "cat"),
                        max_train_steps=1, random_flip=False))
    assert "with subject dog's prompt 'a photo of sks dog'" in caplog.text and str(Path(dataset_dir) / "cat") in caplog.text
    assert json.loads((out / "adapter_config.json").read_text())["step"] == 1


def test_another_runs_folder_is_never_taken_for_this_one(reference_run, tiny_pipeline, dataset_dir, tmp_path,
                                                          monkeypatch, capsys):
    """Resume is the default, so a folder holding another run (another subject, other photos, other settings)
    must not be skipped as finished or resumed: one line naming what differs; --overwrite starts over."""
    import shutil

    import dreambooth_singlora.train_dreambooth as T

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    argv = cli_args(cfg_for(tiny_pipeline, dataset_dir, out))
    monkeypatch.setattr(T.Base, "load", lambda *a: pytest.fail("a finished run loaded the model"))
    main(argv)  # the same run: finished, skipped without loading a model
    monkeypatch.undo()
    for change, differs in ((["--subject", "cat"], "subject"), (["--learning_rate", "3e-4"], "learning_rate")):
        with pytest.raises(SystemExit) as e:
            main(argv + change)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"({differs} differs)" in line and "--overwrite" in line
    (out / "adapter_model.safetensors").unlink()  # killed before its adapter: only its checkpoints are there
    with pytest.raises(SystemExit):
        main(argv + ["--learning_rate", "3e-4"])
    assert "a checkpoint of another run of dog (learning_rate differs)" in capsys.readouterr().err
    main(argv + ["--learning_rate", "3e-4", "--overwrite", "--max_train_steps", "2"])
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["step"] == 2 and meta["run"]["learning_rate"] == 3e-4


def test_loss_of_a_channels_last_prediction_is_the_same():
    """With --channels_last (CUDA graphs on a GPU) the UNet's prediction comes back channels-last: the
    per-subject loss must read it as it reads a contiguous one (a .view of it fails)."""
    from diffusers import DDPMScheduler

    import dreambooth_singlora.train_dreambooth as T

    class Data:  # what group_losses reads of a TrainData: one micro-batch of latents and embeddings
        def __init__(self, seed):
            self.gen = torch.Generator().manual_seed(seed)
            self.latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed + 1),
                                       dtype=torch.float64)

        def batch(self, step, micro):
            self.gen.manual_seed(step)
            return self.latents, {"encoder_hidden_states": torch.zeros(2, 3, 5, dtype=torch.float64)}, self.gen

    base = noise_schedule(DDPMScheduler())  # what group_losses reads of a Base
    losses = [T.group_losses(lambda x, t, emb, cl=cl: (x * 0.5).contiguous(memory_format=torch.channels_last if cl
                                                                           else torch.contiguous_format),
                             base, [Data(0), Data(7)], 3, 0, None, torch.float64) for cl in (False, True)]
    assert losses[0].shape == (2,)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)  # the same numbers, only another layout


VALIDATE_AT_2 = dict(validation_prompt="a photo of sks dog", validation_steps=2, num_validation_images=1)


@pytest.mark.parametrize("method, subjects", [("singlora", None), ("lora", None), ("dora", None),
                                              ("singlora", ["dog", "cat"]), ("lora", ["dog", "cat"])])
def test_bf16_trains_every_method_without_autocast(method, subjects, tiny_pipeline, dataset_dir, tmp_path):
    """--mixed_precision bf16 with the default --no-autocast: the frozen UNet runs in bf16 as loaded, and PEFT's
    layers, SingLoRA and the banks cast their fp32 tensors themselves. Every method trains: its saved tensors are
    fp32 and finite and moved (a subject's adapter between two checkpoints; two subjects' apart from their
    common start)."""
    one = subjects is None
    validation = VALIDATE_AT_2 if one else {}  # one adapter renders in bf16 too (on the UNet's bf16 outputs)
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path, mixed_precision="bf16", method=method, max_train_steps=2,
                  checkpointing_steps=1, ramp_steps=0, subject="dog" if one else None, subjects=subjects, **validation)
    assert cfg.autocast is False  # the default
    with fresh_accelerate_state():  # bf16: other tests' in-process runs set accelerate's state to "no"
        train(cfg)
    folders = [tmp_path] if one else [tmp_path / s for s in subjects]
    final = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    if one:
        assert (tmp_path / "validation" / "step-00002.png").stat().st_size > 0
    for tensors in final:
        assert {v.dtype for v in tensors.values()} == {torch.float32}
        assert all(torch.isfinite(v).all() for v in tensors.values())
    other = load_file(str(tmp_path / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")) if one \
        else final[1]
    assert max((final[0][k] - other[k]).abs().max().item() for k in other) > 0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("subjects", [None, ["dog", "cat"]], ids=["one", "bank"])
def test_autocast_flag_reaches_the_unet_in_a_run(autocast, subjects, tiny_pipeline, dataset_dir, tmp_path,
                                                 monkeypatch):
    """In a real bf16 run, every call of the UNet (training steps, and for one subject its validation render
    under accelerator.autocast()) runs under torch.autocast exactly when --autocast is given, for one adapter
    and for a bank; train_stats.json says which. (On the CPU bf16 autocast leaves the norms in bf16, so the
    numbers cannot tell: a hook on the UNet's first layer reads autocast's state.)"""
    import dreambooth_singlora.train_dreambooth as T

    seen, load = [], T.Base.load

    def load_and_watch(*args, **kwargs):
        models = load(*args, **kwargs)
        models.unet.conv_in.register_forward_pre_hook(
            lambda module, inputs: seen.append(torch.is_autocast_enabled(inputs[0].device.type)))
        return models

    monkeypatch.setattr(T.Base, "load", load_and_watch)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the same on a machine with a GPU
    one = subjects is None
    validation = VALIDATE_AT_2 if one else {}
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path, mixed_precision="bf16", autocast=autocast, max_train_steps=2,
                  checkpointing_steps=2, subject="dog" if one else None, subjects=subjects, **validation)
    with fresh_accelerate_state():
        train(cfg)
    assert len(seen) >= 2 and set(seen) == {autocast}  # (a bank: one call a step)
    stats = json.loads(((tmp_path if one else tmp_path / "dog") / "train_stats.json").read_text())
    assert stats["autocast"] is autocast and stats["mixed_precision"] == "bf16"


def test_the_training_loop_fits_one_screen():
    """Issue 11's rule for the one loop of 1..N subjects: 80 lines or fewer, in labelled phases (it had crept to 82)."""
    import inspect

    from dreambooth_singlora.train_dreambooth import train_group

    source = inspect.getsource(train_group)
    assert len(source.splitlines()) <= 80
    assert [line.strip()[:4] for line in source.splitlines() if line.strip()[:3] in ("# 1", "# 2", "# 3", "# 4")] == \
        ["# 1.", "# 2.", "# 3.", "# 4."]


def test_a_recorded_run_is_this_run_only_if_equal(tmp_path):
    """run_differs names the first differing key, a key that only the recorded run has included (a folder written
    with settings this version does not know is not taken for this run)."""
    from dreambooth_singlora.config import TrainConfig
    from dreambooth_singlora.train_dreambooth import Member, run_differs, run_of

    cfg = TrainConfig(pretrained_model_name_or_path="x", instance_data_dir=str(tmp_path), instance_prompt="a sks dog")
    member = Member("dog", [], "a sks dog", None, None, tmp_path, [["a.jpg", 3]])
    ours = run_of(cfg, member)
    assert run_differs(cfg, member, dict(ours)) is None
    assert run_differs(cfg, member, {**ours, "seed": 1}) == "seed"
    assert run_differs(cfg, member, {**ours, "a_later_setting": None}) == "a_later_setting"
    assert run_differs(cfg, member, {k: v for k, v in ours.items() if k != "class_prompt"}) == "class_prompt"
    assert run_differs(cfg, member, None) == "subject"


def test_several_validation_prompts_render_a_row_each(tiny_pipeline, dataset_dir, tmp_path):
    """--validation_prompt takes several prompts (the UI's one a line): each renders num_validation_images with the
    same seeds, a row of the grid each; a single string from the Python API is one prompt."""
    from PIL import Image

    assert TrainConfig(pretrained_model_name_or_path="x", instance_data_dir="d", instance_prompt="a sks dog",
                       validation_prompt="a sks dog").validation_prompt == ["a sks dog"]
    prompts = ["a photo of sks dog", "a sks dog on the beach"]
    cfg = cfg_for(tiny_pipeline, dataset_dir, tmp_path, max_train_steps=2, checkpointing_steps=2,
                  validation_prompt=prompts, validation_steps=2, num_validation_images=2)
    train(cfg)
    step = tmp_path / "validation" / "step-00002"
    assert sorted(p.name for p in step.iterdir()) == ["0-0.png", "0-1.png", "1-0.png", "1-1.png"]
    for i, prompt in enumerate(prompts):
        for k in range(2):
            with Image.open(step / f"{i}-{k}.png") as im:
                assert im.text["prompt"] == prompt and im.text["seed"] == str(cfg.seed + k)
    assert (tmp_path / "validation" / "step-00002.png").stat().st_size > 0
