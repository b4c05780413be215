"""The web UI's handlers called as functions (no browser, no HTTP): the queue, path safety, uploads, and one run
trained, watched, generated, exported and scored on the tiny pipeline through the real CLI subprocesses."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_singlora.errors import UserError
from dreambooth_singlora.ui import app, forms, paths
from dreambooth_singlora.ui.jobs import Queue, accepts, cli
from dreambooth_singlora.ui.runs import progress

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def photos_in(ws: Path, dataset_dir, n=3) -> list[str]:
    """Copies of n dog photos where Gradio puts uploads (<workspace>/.gradio/...), as the upload widget hands them."""
    up = ws / ".gradio" / "upload"
    up.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(Path(dataset_dir, "dog").glob("*.jpg"))[:n]:
        shutil.copy(p, up / p.name)
        out.append(str(up / p.name))
    return out


def train_form(ws, tiny_pipeline, files, **kw):
    form = dict(run="r", subject="", dataset_dir="", photos=files, noun="dog", token="sks", base_model=tiny_pipeline,
                method="singlora", rank=4, steps=2, learning_rate=1e-4, prior=False, resolution=32,
                validation_prompt="a sks dog", preset="none", report_to="none")
    form.update(kw)
    return form


# ---------------------------------------------------------------- path safety
def test_typed_paths_that_leave_the_workspace_are_refused(tmp_path):
    ws = tmp_path / "ws"
    (ws / "runs").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (ws / "runs" / "link").symlink_to(outside)
    assert paths.inside(ws, "runs") == (ws / "runs").resolve()
    with pytest.raises(UserError, match=r"leaves the workspace by '\.\.'"):
        paths.inside(ws, "runs/../../secret")
    with pytest.raises(UserError, match="is absolute"):
        paths.inside(ws, str(outside))
    with pytest.raises(UserError, match="through a symlink"):
        paths.inside(ws, "runs/link/file.txt")
    for bad in ("../x", "a/b", ".hidden", "", "x" * 65, "a b"):
        with pytest.raises(UserError, match="not allowed"):
            paths.check_name(bad)
    assert paths.check_name("dog-1.v2") == "dog-1.v2"


def test_job_ids_typed_into_the_ui_stay_inside_the_jobs_folder(tmp_path):
    ui = app.UI(tmp_path / "ws")
    assert ui.stop("../../etc").startswith("Refused: job id '../../etc' is not allowed")
    assert ui.live("../x")["status"].startswith("job id '../x' is not allowed")


# ---------------------------------------------------------------- launch settings
def test_other_hosts_need_a_login_and_nothing_is_shared(tmp_path):
    parser = app.build_parser()
    ws = tmp_path / "ws"
    with pytest.raises(UserError, match="--host 0.0.0.0 would let other machines reach the UI"):
        app.launch_settings(parser.parse_args(["--workspace", str(ws), "--host", "0.0.0.0"]))
    s = app.launch_settings(parser.parse_args(["--workspace", str(ws)]))
    assert s["server_name"] == "127.0.0.1" and s["share"] is False and s["auth"] is None
    assert s["allowed_paths"] == [str(ws.resolve())]
    assert str(ws.resolve() / "jobs") in s["blocked_paths"]
    users = tmp_path / "users.txt"
    users.write_text("# logins\nann:pass word\nbob:x:y\n")
    s = app.launch_settings(parser.parse_args(["--workspace", str(ws), "--host", "0.0.0.0", "--auth_file",
                                               str(users), "--auth", "cy:z"]))
    assert s["auth"] == [("cy", "z"), ("ann", "pass word"), ("bob", "x:y")] and s["share"] is False
    assert str(users.resolve()) in s["blocked_paths"]  # the logins are never served, even from the workspace
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(UserError, match="USER:PASSWORD"):
            app.launch_settings(parser.parse_args(["--workspace", str(ws), "--host", "0.0.0.0", "--auth", bad]))
    users.write_text("# nothing\n")
    with pytest.raises(UserError, match="has no login"):
        app.launch_settings(parser.parse_args(["--workspace", str(ws), "--host", "::", "--auth_file", str(users)]))
    assert app.is_loopback("127.0.0.2") and app.is_loopback("::1") and not app.is_loopback("example.org")


def test_build_parser_imports_neither_gradio_nor_torch():
    import subprocess

    code = ("import sys; from dreambooth_singlora.ui.app import build_parser; build_parser().parse_args([]); "
            "print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- uploads
def test_uploads_that_are_not_good_photos_are_refused_and_nothing_is_kept(tmp_path, tiny_pipeline, dataset_dir):
    ws = tmp_path / "ws"
    ui = app.UI(ws)
    up = ws / ".gradio" / "upload"

    def bad(name):
        up.mkdir(parents=True, exist_ok=True)
        if name == "notes.jpg":
            (up / name).write_bytes(b"this is not a picture")
        elif name == "tiny.png":
            Image.new("RGB", (20, 20)).save(up / name)
        else:
            (up / name).write_bytes(b"\0" * (forms.MAX_PHOTO_BYTES + 1))
        return str(up / name)

    cases = [(lambda: [*photos_in(ws, dataset_dir, 2), bad("notes.jpg")], "notes.jpg is not an image"),
             (lambda: photos_in(ws, dataset_dir, 2), "2 photos given: upload 3 to 20"),
             (lambda: photos_in(ws, dataset_dir, 3) * 7, "21 photos given"),
             (lambda: [*photos_in(ws, dataset_dir, 2), bad("tiny.png")], "tiny.png is 20x20 px"),
             (lambda: [*photos_in(ws, dataset_dir, 2), bad("big.png")], "big.png is 25.0 MiB")]
    for files, message in cases:
        given = files()
        msg, job = ui.start_train("r", "", "", given, "dog", "sks", tiny_pipeline, "singlora", 4, 2, 1e-4, False,
                                  32, "", "none", "none")
        assert msg.startswith("Refused: ") and message in msg and job == "", msg
        assert not (ws / "runs" / "r").exists()  # no half-made run folder
        assert not (ws / ".staging").exists() or not any((ws / ".staging").iterdir())
        assert all(Path(f).is_file() for f in given)  # a refused form keeps the uploads: the page still shows them
    assert ui.queue.jobs() == []


def test_train_form_refusals(tmp_path, tiny_pipeline, dataset_dir):
    ws = tmp_path / "ws"
    for change, message in [(dict(run="../up"), "run name '../up' is not allowed"),
                            (dict(base_model=str(tmp_path / "nope")), "base model"),
                            (dict(resolution=30), "not a multiple of 8"),
                            (dict(method="dreamlora"), "unknown method"),
                            (dict(preset="4 GB"), "unknown memory preset"),
                            (dict(token="two words"), r"rare token \(one word")]:
        with pytest.raises(UserError, match=message):
            forms.new_train(ws, train_form(ws, tiny_pipeline, photos_in(ws, dataset_dir), **change))
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())


def test_presets_set_the_trainers_memory_flags():
    assert forms.preset_flags("12 GB") == {"gradient_checkpointing": True, "train_batch_size": 1,
                                           "use_8bit_adam": False}
    assert forms.preset_flags("24 GB")["gradient_checkpointing"] is False
    eight = forms.preset_flags("8 GB")
    import importlib.util

    assert eight["use_8bit_adam"] is (importlib.util.find_spec("bitsandbytes") is not None)


# ---------------------------------------------------------------- queue
def test_queue_cancel_stop_and_a_restarted_ui_finds_a_running_job(tmp_path):
    q = Queue(tmp_path / "ws")
    a = q.submit("generate", SLEEP, run="x")
    b = q.submit("generate", SLEEP, run="x")
    assert not a.events and not a.stop_file  # not a CLI command: no --events / --stop_file added
    q.tick()
    assert q.load(a.id).status == "running" and q.load(b.id).status == "queued"  # one at a time on the one slot
    assert q.cancel(b.id).status == "cancelled"
    with pytest.raises(UserError, match="only a queued job can be cancelled"):
        q.cancel(a.id)
    # a restarted UI (a new Queue, no Popen of its own) finds the running job by pid and start time
    q2 = Queue(tmp_path / "ws")
    q2.tick()
    job = q2.load(a.id)
    assert job.status == "running" and q2._alive(job)
    job.pid_start -= 100  # a pid now used by another process is not the job
    assert not q2._alive(job)
    q2.stop(a.id)
    q.tick()  # the first queue reaps its child
    done = q.wait(a.id, 20)
    assert done.status == "stopped" and done.stop_requested
    with pytest.raises(UserError, match="only a queued or running job can be stopped"):
        q.stop(a.id)


def test_a_second_ui_on_the_same_workspace_is_refused(tmp_path):
    q = Queue(tmp_path / "ws").start()
    try:
        with pytest.raises(UserError, match="another web UI"):
            Queue(tmp_path / "ws").claim()
    finally:
        q.close()


def test_events_are_read_into_the_live_view(tmp_path):
    q = Queue(tmp_path / "ws")
    job = q.submit("train", cli("train", "--output_dir", "x"), run="r")
    assert job.events == accepts(job.argv, "--events")
    job.events = True
    lines = [{"event": "started", "time": 1, "job": "train"},
             {"event": "step", "time": 2, "job": "train", "step": 10, "total": 40, "loss": {"dog": 0.5, "cat": 0.25},
              "lr": 1e-4, "u": 0.25, "it_per_s": 4.0, "eta_s": 7.5},
             {"event": "validation", "time": 3, "job": "train", "step": 10,
              "paths": [str(q.workspace / "runs/r/adapter/validation/step-00010.png"), "/etc/passwd"]}]
    q.events_path(job).write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "st')  # a half line
    p = progress(q, job)
    assert (p["step"], p["total"], p["it_per_s"], p["eta_s"]) == (10, 40, 4.0, 7.5)
    assert sorted((r["subject"], r["loss"]) for r in p["loss"]) == [("cat", 0.25), ("dog", 0.5)]
    assert {(r["series"], r["value"]) for r in p["sched"]} == {("lr", 1e-4), ("u", 0.25)}
    assert [v[0] for v in p["validation"]] == [str(q.workspace / "runs/r/adapter/validation/step-00010.png")]


# ---------------------------------------------------------------- one run through every tab's handlers
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline, dataset_dir):
    """A 100-step run on the tiny pipeline from uploaded photos, through the queue and the real trainer: stopped
    from the UI once its first loss is in, then resumed to its end. (ui, the stopped job, the resumed job)."""
    ws = tmp_path_factory.mktemp("ui") / "ws"
    ui = app.UI(ws)
    msg, job_id = ui.start_train("dog1", "dog", "", photos_in(ws, dataset_dir), "", "sks", tiny_pipeline,
                                 "singlora", 4, 100, 1e-4, False, 32, "a sks dog", "none", "none")
    assert job_id, msg
    end = time.monotonic() + 180
    while ui.queue.load(job_id).status in ("queued", "running") and not ui.live(job_id)["loss"]:
        assert time.monotonic() < end
        ui.queue.tick()
        time.sleep(0.05)
    assert ui.stop(job_id).startswith("Stop requested")
    stopped = ui.queue.wait(job_id, 120)
    msg, again = ui.resume(job_id)
    assert again, msg
    return ui, stopped, ui.queue.wait(again, 180)


def events_of(ui, job):
    return [json.loads(x) for x in (ui.workspace / "jobs" / job.id / "events.jsonl").read_text().splitlines()]


def test_stop_then_resume_continues_the_run(trained):
    ui, stopped, resumed = trained
    assert stopped.status == "stopped", ui.live(stopped.id)["log"]
    last = events_of(ui, stopped)[-1]
    assert last["event"] == "stopped" and last["step"] < 100 and last["checkpoint"]
    assert resumed.status == "finished", ui.live(resumed.id)["log"]
    steps = [e["step"] for e in events_of(ui, resumed) if e["event"] == "step"]
    assert steps[0] > last["step"] and steps[-1] == 100  # it went on from the checkpoint, not from step 0
    assert resumed.argv == stopped.argv  # the same command
    assert ui.resume(resumed.id)[0] == (f"Refused: job {resumed.id} is finished: only a stopped, failed or "
                                        "cancelled job can be resumed")


def test_training_through_the_queue(trained):
    ui, _, job = trained
    view = ui.live(job.id)
    assert "finished; step 100/100" in view["status"]
    events = [e["event"] for e in events_of(ui, job)]
    assert events[0] == "started" and events[-1] == "finished" and "step" in events and "validation" in events
    assert view["loss"] and all(r["loss"] > 0 and r["subject"] == "dog1" for r in view["loss"])
    assert view["validation"] and all(Path(p).is_file() for p, _ in view["validation"])
    ws = ui.workspace
    settings = json.loads((ws / "runs" / "dog1" / "run.json").read_text())
    assert settings["prompt"] == "a photo of sks dog" and settings["subject"] == "dog"
    assert sorted(p.name for p in (ws / "runs" / "dog1" / "photos" / "dog").iterdir()) == ["00.png", "01.png",
                                                                                          "02.png"]
    detail = ui.run_detail("dog1")
    assert detail["status"] == "dog1: finished" and "argv" not in detail["settings"]
    assert not detail["card"].startswith("---") and "a photo of sks dog" in detail["card"]  # front matter off
    assert any(f.endswith("adapter_model.safetensors") for f in detail["files"])
    assert (ws / "runs" / "dog1" / "adapter" / "checkpoints").is_dir()
    assert not [f for f in detail["files"] if "/checkpoints/" in f]  # the run's own files, not its checkpoints
    assert [r[:2] for r in ui.runs()] == [["dog1", "finished"]]


def test_generate_export_and_evaluate(trained, tiny_eval_checkpoints):
    ui = trained[0]
    msg, gen = ui.generate("dog1", "", 5, 1, 0.5, 1, 7.5, "ddim", True, 32)
    assert gen, msg
    g = ui.queue.wait(gen, 180)
    assert g.status == "finished", ui.live(gen)["log"]
    view = ui.generate_view(gen)
    assert len(view["gallery"]) == 25 and view["gallery"][0][1].endswith(" - seed 5")
    assert all(Path(p).is_file() for p, _ in view["gallery"]) and Path(view["zip"]).is_file()
    with Image.open(view["gallery"][0][0]) as im:
        assert im.size == (32, 32)

    msg, path = ui.export("dog1", "kohya")
    assert path and Path(path).name == "dog1-kohya.safetensors", msg
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    assert ui.export("dog1", "onnx")[0].startswith("Refused: unknown export format")
    assert ui.export("nope", "kohya")[0] == "Refused: run 'nope' has no saved adapter yet: train it to the end first"

    sets = ui.image_sets("dog1")
    assert len(sets) == 1
    assert ui.evaluate("dog1", sets[0], "/nonexistent/clip", tiny_eval_checkpoints["dino_dir"])[0].startswith(
        "Refused: CLIP checkpoint /nonexistent/clip does not exist")
    assert "Refused" in ui.evaluate("dog1", "../" + sets[0], tiny_eval_checkpoints["clip_dir"],
                                    tiny_eval_checkpoints["dino_dir"])[0]
    msg, ev = ui.evaluate("dog1", sets[0], tiny_eval_checkpoints["clip_dir"], tiny_eval_checkpoints["dino_dir"])
    assert ev, msg
    e = ui.queue.wait(ev, 180)
    assert e.status == "finished", ui.live(ev)["log"]
    report = ui.eval_view(ev)
    header = report["summary"][0]
    metrics = {row[header.index("metric")] for row in report["summary"][1:]}
    assert {"dino", "clip_i", "clip_t"} <= metrics
    assert len(report["per_prompt"]) == 26  # header + 25 prompts
    assert any(Path(p).name == "contact_sheet.png" for p, _ in report["grids"])


def test_a_dreambooth_subject_from_the_dataset_folder(tmp_path, tiny_pipeline, dataset_dir):
    ws = tmp_path / "ws"
    with pytest.raises(UserError, match="dataset folder .* does not exist"):
        forms.new_train(ws, train_form(ws, tiny_pipeline, [], subject="cat", noun="",
                                       dataset_dir=str(tmp_path / "no-dataset")))
    argv, settings = forms.new_train(ws, train_form(ws, tiny_pipeline, [], subject="cat", noun="",
                                                    dataset_dir=dataset_dir, preset="12 GB"))
    photos = ws / "runs" / "r" / "photos" / "cat"
    assert len(list(photos.iterdir())) == len(list(Path(dataset_dir, "cat").glob("*.jpg")))
    assert settings["prompt"] == "a photo of sks cat" and settings["label"] == "cat"
    assert argv[argv.index("--instance_data_dir") + 1] == str(photos)
    assert argv[argv.index("--class_prompt") + 1] == "a photo of cat"
    assert "--gradient_checkpointing" in argv and argv[argv.index("--train_batch_size") + 1] == "1"
    assert "--no-use_8bit_adam" in argv
    from dreambooth_singlora.config import train_parser

    train_parser().parse_args(argv[4:])  # the trainer's own parser takes the command the form built
    assert argv[argv.index("--resolution") + 1] == "32"
    argv, _ = forms.new_train(ws, train_form(ws, tiny_pipeline, [], subject="cat", noun="", dataset_dir=dataset_dir,
                                             run="r2", resolution=None))
    assert "--resolution" not in argv  # an empty field: the trainer takes the base's own (1024 for SDXL)


def test_one_job_on_each_gpu_slot(tmp_path):
    code = "import os, time; print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True); time.sleep(60)"
    q = Queue(tmp_path / "ws", slots=["0", "1"])
    jobs = [q.submit("generate", [sys.executable, "-c", code]) for _ in range(3)]
    q.tick()
    assert [q.load(j.id).status for j in jobs] == ["running", "running", "queued"]
    assert [q.load(j.id).gpu for j in jobs[:2]] == ["0", "1"]
    end = time.monotonic() + 30
    while not all(f"gpu {g}" in q.log_path(j).read_text() for g, j in zip("01", jobs)):  # each saw its own GPU
        assert time.monotonic() < end
        time.sleep(0.05)
    for j in jobs[:2]:
        assert q.stop(j.id).stop_requested
    for j in jobs[:2]:
        assert q.wait(j.id, 20).status == "stopped"
    q.tick()
    assert q.load(jobs[2].id).status == "running" and q.load(jobs[2].id).gpu in ("0", "1")
    q.stop(jobs[2].id)
    assert q.wait(jobs[2].id, 20).status == "stopped"


def test_train_form_previews(tmp_path, tiny_pipeline):
    ui = app.UI(tmp_path / "ws")
    assert ui.family(tiny_pipeline) == "Model family: **sd1**"
    missing = ui.family(str(tmp_path / "no-model"))
    assert missing.startswith("Model family: **unknown (") and "no-model" in missing
    assert ui.family("") == "Model family: **unknown (no base model given)**"
    assert ui.prompt_preview("", "teddy bear", "zwx").startswith("Instance prompt: **a photo of zwx teddy bear**")
    assert ui.prompt_preview("cat2", "", "sks").startswith("Instance prompt: **a photo of sks cat**")
    assert ui.class_noun("backpack") == "backpack" and ui.class_noun("") == ""
    assert "8-bit Adam" in ui.preset_note("8 GB") and ui.preset_note("2 GB").startswith("unknown memory preset")


def test_a_second_stop_of_a_trainer_sends_sigterm(tmp_path):
    q = Queue(tmp_path / "ws")
    job = q.submit("train", SLEEP)
    job.stop_file = True  # as the trainer's: the first Stop writes the stop file (which this sleeper ignores)
    q.save(job)
    q.tick()
    q.stop(job.id)
    assert (q.job_dir(job.id) / "STOP").is_file()
    time.sleep(0.3)
    q.tick()
    assert q.load(job.id).status == "running"
    q.stop(job.id)  # asked again: SIGTERM
    assert q.wait(job.id, 20).status == "stopped"


def test_a_single_file_base_model_needs_its_base_config(tmp_path, tiny_pipeline, dataset_dir):
    ws = tmp_path / "ws"
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")  # the form only checks that it exists; the trainer reads it
    with pytest.raises(UserError, match="a single .safetensors file needs a base config"):
        forms.new_train(ws, train_form(ws, tiny_pipeline, photos_in(ws, dataset_dir), base_model=str(single)))
    with pytest.raises(UserError, match="base config .*no-config does not exist"):
        forms.new_train(ws, train_form(ws, tiny_pipeline, photos_in(ws, dataset_dir), base_model=str(single),
                                       base_config=str(tmp_path / "no-config")))
    argv, settings = forms.new_train(ws, train_form(ws, tiny_pipeline, photos_in(ws, dataset_dir),
                                                    base_model=str(single), base_config=str(tiny_pipeline)))
    assert argv[argv.index("--base_config") + 1] == str(Path(tiny_pipeline).resolve())
    assert argv[argv.index("--pretrained_model_name_or_path") + 1] == str(single.resolve())
    from dreambooth_singlora.config import train_parser

    train_parser().parse_args(argv[4:])
    assert app.UI(ws).family(str(single), str(tiny_pipeline)) == "Model family: **sd1**"


# ---------------------------------------------------------------- races and ends (review fixes)
def test_two_starts_of_one_run_name_keep_the_first_run(tmp_path, tiny_pipeline, dataset_dir, monkeypatch):
    """A double click on Start: both calls get past the name check together (a barrier right after it); the run
    folder goes to one of them, whole, and the other is refused in one line without touching it."""
    import threading

    ws = tmp_path / "ws"
    ui = app.UI(ws)
    uploads = []
    for k in range(2):  # each click hands its own upload copies
        files = photos_in(ws, dataset_dir)
        uploads.append([shutil.copy(f, f"{f}.{k}.jpg") for f in files])
    barrier, real_run_dir = threading.Barrier(2, timeout=20), forms.run_dir

    def run_dir(workspace, run):
        out = real_run_dir(workspace, run)
        barrier.wait()
        return out

    monkeypatch.setattr(forms, "run_dir", run_dir)
    results = [None, None]

    def start(k):
        try:
            results[k] = ui.start_train("r1", "", "", uploads[k], "dog", "sks", tiny_pipeline, "singlora", 4, 2,
                                        1e-4, False, 32, "", "none", "none")
        except BaseException as e:  # noqa: BLE001 - an exception is a wrong answer here: it is recorded
            results[k] = (f"raised {type(e).__name__}: {e}", "")

    threads = [threading.Thread(target=start, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [r for r in results if r[1]]
    lost = [r for r in results if not r[1]]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0][0] == ("Refused: run 'r1' already exists: choose another name (or resume it from the Live run "
                          "tab)"), results
    rdir = ws / "runs" / "r1"
    assert json.loads((rdir / "run.json").read_text())["run"] == "r1"
    assert sorted(p.name for p in (rdir / "photos" / "dog").iterdir()) == ["00.png", "01.png", "02.png"]
    assert [j.id for j in ui.queue.jobs()] == [won[0][1]]


def test_a_refused_start_keeps_the_uploads_for_the_corrected_start(tmp_path, tiny_pipeline, dataset_dir):
    ws = tmp_path / "ws"
    ui = app.UI(ws)
    files = photos_in(ws, dataset_dir)
    form = ["r1", "", "", files, "dog", "sks", tiny_pipeline, "singlora", 4, "x", 1e-4, False, 32, "", "none", "none"]
    msg, job_id = ui.start_train(*form)
    assert (msg, job_id) == ("Refused: steps 'x' is not a number", "")
    assert all(Path(f).is_file() for f in files) and not (ws / "runs" / "r1").exists()
    form[9] = 2  # the person fixes the steps; the File box still holds the same uploads
    msg, job_id = ui.start_train(*form)
    assert job_id and msg.startswith("Queued training of run r1"), msg
    assert len(list((ws / "runs" / "r1" / "photos" / "dog").iterdir())) == 3
    assert not any(Path(f).exists() for f in files)  # dropped once the run holds its copies


def test_a_trainer_killed_after_a_stop_request_failed(tmp_path):
    """A Stop asked for, then the process dies by SIGKILL (the OOM killer) before its stop: not a clean stop."""
    import os
    import signal

    q = Queue(tmp_path / "ws")
    code = "import time; print('loading', 'the base model', flush=True); time.sleep(60)"  # not its own argv's text
    job = q.submit("train", [sys.executable, "-c", code])
    job.stop_file = True  # as the trainer's: Stop writes the stop file, which this process never reads
    q.save(job)
    q.tick()
    end = time.monotonic() + 30
    while "loading the base model" not in q.log_path(job).read_text():
        assert time.monotonic() < end
        time.sleep(0.05)
    assert q.stop(job.id).stop_requested
    os.kill(q.load(job.id).pid, signal.SIGKILL)
    done = q.wait(job.id, 20)
    assert (done.status, done.returncode) == ("failed", -signal.SIGKILL)
    assert done.error == f"loading the base model (exit status {-signal.SIGKILL})"


def test_views_of_a_job_of_another_kind_answer_with_a_status_line(tmp_path):
    ui = app.UI(tmp_path / "ws")
    job = ui.queue.submit("train", SLEEP, run="r", outputs={"adapter": "runs/r/adapter"})
    assert ui.generate_view(job.id) == dict(
        status=f"job {job.id} is a train job: it made no images; choose a generation job", gallery=[], zip=None)
    assert ui.eval_view(job.id) == dict(
        status=f"job {job.id} is a train job: it wrote no report; choose a scoring job", summary=[], per_prompt=[],
        grids=[])


def test_two_viewers_of_a_finished_generation_both_get_the_whole_zip(tmp_path, monkeypatch):
    """Two timer ticks build the download at the same moment (a barrier once each has opened its archive file):
    each gets the whole zip."""
    import threading
    import zipfile

    ui = app.UI(tmp_path / "ws")
    folder = ui.workspace / "runs" / "r" / "images" / "set1" / "dog"
    (folder / "a-dog").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(folder / "a-dog" / f"{k}.png")
    job = ui.queue.submit("generate", SLEEP, run="r", outputs={"images": "runs/r/images/set1/dog"})
    job.status = "finished"
    ui.queue.save(job)
    barrier, real = threading.Barrier(2, timeout=20), zipfile.ZipFile.__init__

    def opened(self, *a, **kw):
        real(self, *a, **kw)
        barrier.wait()

    monkeypatch.setattr(zipfile.ZipFile, "__init__", opened)
    views = [None, None]

    def view(k):
        try:
            views[k] = ui.generate_view(job.id)
        except BaseException as e:  # noqa: BLE001 - recorded: an exception is the wrong answer
            views[k] = e

    threads = [threading.Thread(target=view, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()
    assert all(isinstance(v, dict) for v in views), views
    z = Path(views[0]["zip"])
    assert views[1]["zip"] == str(z)
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == ["a-dog/", "a-dog/0.png", "a-dog/1.png", "a-dog/2.png"]
    assert [p.name for p in z.parent.iterdir()] == ["set1.zip"]  # no part file left behind


def test_a_refused_claim_closes_its_lock_file(tmp_path, monkeypatch):
    import builtins

    q = Queue(tmp_path / "ws").start()
    opened, real_open = [], builtins.open

    def spy(*a, **kw):
        f = real_open(*a, **kw)
        opened.append(f)
        return f

    try:
        second = Queue(tmp_path / "ws")
        monkeypatch.setattr(builtins, "open", spy)
        with pytest.raises(UserError, match=rf"another web UI \(pid {__import__('os').getpid()}\)"):
            second.claim()
        monkeypatch.undo()
        assert opened and all(f.closed for f in opened)
    finally:
        q.close()


def test_the_forms_lists_and_limits_are_the_clis(tmp_path):
    from dreambooth_singlora import config

    assert forms.METHODS is config.METHODS and forms.SCHEDULERS is config.SCHEDULERS
    s = app.launch_settings(app.build_parser().parse_args(["--workspace", str(tmp_path / "ws")]))
    assert s["max_file_size"] == forms.MAX_PHOTO_BYTES
