"""The event stream out of training and generating, and the stop request from outside: a run stopped at a step
boundary resumes to exactly the uninterrupted run's adapter."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_singlora.config import TrainConfig
from dreambooth_singlora.events import ENDS, Events, JsonLines, StopRequest, follow, job, read_events
from dreambooth_singlora.train_dreambooth import train

STEPS = 8


def cfg_for(tiny_pipeline, dataset_dir, out, **kw):
    return TrainConfig(**{**dict(pretrained_model_name_or_path=str(tiny_pipeline), subject="dog",
                                 dataset_dir=dataset_dir, output_dir=str(out), resolution=32, max_train_steps=STEPS,
                                 checkpointing_steps=4, log_every=2, report_to="none", ramp_steps=3, rank=4,
                                 mixed_precision="no"), **kw})


def argv(cfg: TrainConfig, **extra) -> list[str]:
    keys = ("pretrained_model_name_or_path", "subject", "dataset_dir", "output_dir", "resolution", "max_train_steps",
            "checkpointing_steps", "log_every", "report_to", "ramp_steps", "rank", "mixed_precision")
    d = {**{k: getattr(cfg, k) for k in keys}, **extra}
    return [x for k, v in d.items() for x in (f"--{k}", str(v))] + ["--no-fast_exit"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline, dataset_dir, tmp_path_factory):
    """An uninterrupted run, in process, with its events file."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(cfg_for(tiny_pipeline, dataset_dir, out, events=str(out / "events.jsonl")))
    return out


def test_a_run_reports_every_event_as_a_json_line(uninterrupted):
    events = read_events(uninterrupted / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("finished") == 1
    assert events[0]["family"] == "sd1" and events[0]["config"]["max_train_steps"] == STEPS
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [2, 4, 6, 8] and all(e["total"] == STEPS for e in steps)
    for e in steps:  # each subject's loss, lr, u, speed, time left
        assert set(e["loss"]) == {"dog"} and e["loss"]["dog"] > 0 and e["lr"] == pytest.approx(1e-4)
        assert e["it_per_s"] > 0 and e["eta_s"] >= 0
    assert [e["u"] for e in steps] == [pytest.approx(2 / 3), 1.0, 1.0, 1.0]  # the ramp, T = 3
    history = json.loads((uninterrupted / "train_stats.json").read_text())["loss_history"]
    assert [[e["step"], e["loss"]["dog"]] for e in steps] == history  # the same numbers the run records
    assert [(e["step"], Path(e["path"]).name) for e in events if e["event"] == "checkpoint"] == \
        [(4, "checkpoint-4"), (8, "checkpoint-8")]
    saved = [e for e in events if e["event"] == "saved"]
    assert len(saved) == 1 and Path(saved[0]["path"]) == uninterrupted
    assert all(e["job"] == "train" and e["time"] > 0 for e in events)


def test_bad_input_ends_the_stream_with_failed_and_its_one_line(tiny_pipeline, tmp_path, capsys):
    from dreambooth_singlora.train_dreambooth import main

    with pytest.raises(SystemExit):
        main(["--pretrained_model_name_or_path", str(tiny_pipeline), "--instance_data_dir", str(tmp_path / "none"),
              "--instance_prompt", "a sks dog", "--output_dir", str(tmp_path / "o"), "--events", str(tmp_path / "e")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    events = read_events(tmp_path / "e")
    assert [e["event"] for e in events] == ["failed"] and events[0]["error"] == line and "does not exist" in line


STOP_DRIVER = """import sys
from pathlib import Path
import dreambooth_singlora.train_dreambooth as T
real = T.group_losses
def losses(denoise, base, datas, step, micro, *a):
    if step == int(sys.argv[1]):
        Path(sys.argv[2]).touch()  # the stop request arrives in the middle of this step
    return real(denoise, base, datas, step, micro, *a)
T.group_losses = losses
T.main(sys.argv[3:])
"""


def same_adapter(a, b) -> bool:
    ours, ref = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_a_stop_file_stops_at_the_next_step_and_the_same_command_resumes_exactly(uninterrupted, tiny_pipeline,
                                                                               dataset_dir, tmp_path):
    out, stop = tmp_path / "run", tmp_path / "please-stop"
    cmd = argv(cfg_for(tiny_pipeline, dataset_dir, out), events=tmp_path / "events.jsonl", stop_file=stop)
    first = subprocess.run([sys.executable, "-c", STOP_DRIVER, "2", str(stop), *cmd], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-2000:]
    events = read_events(tmp_path / "events.jsonl")
    assert events[-1]["event"] == "stopped" and events[-1]["step"] == 3  # after the step it arrived in
    assert Path(events[-1]["checkpoint"]).name == "checkpoint-3" and (out / "checkpoints" / "checkpoint-3").is_dir()
    assert not (out / "adapter_model.safetensors").exists()
    assert "run the same command again to resume" in first.stderr
    second = subprocess.run([sys.executable, "-m", "dreambooth_singlora.train_dreambooth", *cmd], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stderr[-2000:]
    assert not stop.exists() and same_adapter(out, uninterrupted)  # the stop file consumed; the adapter exact
    runs = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in runs].count("started") == 2 and runs[-1]["event"] == "finished"


def test_a_stop_file_in_the_output_folder_stops_an_in_process_run(uninterrupted, tiny_pipeline, dataset_dir, tmp_path,
                                                                  monkeypatch):
    """From the Python API too: train() returns at the stop, and calling it again finishes the same run."""
    import dreambooth_singlora.train_dreambooth as T

    out, real = tmp_path / "run", T.group_losses

    def losses(denoise, base, datas, step, *a):
        if step == 5:
            (out / "STOP").touch()
        return real(denoise, base, datas, step, *a)

    monkeypatch.setattr(T, "group_losses", losses)
    cfg = cfg_for(tiny_pipeline, dataset_dir, out, events=str(tmp_path / "e.jsonl"))
    assert train(cfg) == out and read_events(tmp_path / "e.jsonl")[-1]["step"] == 6
    monkeypatch.undo()
    train(cfg_for(tiny_pipeline, dataset_dir, out))
    assert same_adapter(out, uninterrupted) and not (out / "STOP").exists()


def test_sigterm_from_outside_stops_with_a_checkpoint_and_exit_0(tiny_pipeline, dataset_dir, tmp_path):
    """A real signal from another process, timed by following the events file as a UI would."""
    out, events_file = tmp_path / "run", tmp_path / "events.jsonl"
    cmd = argv(cfg_for(tiny_pipeline, dataset_dir, out, max_train_steps=100_000, checkpointing_steps=100_000,
                       log_every=1), events=events_file)
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth_singlora.train_dreambooth", *cmd],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for event in follow(events_file, poll=0.05, timeout=240):
            if event["event"] == "step":
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    last = read_events(events_file)[-1]
    assert last["event"] == "stopped" and last["reason"] == "SIGTERM" and 1 <= last["step"] < 100_000
    assert (out / "checkpoints" / f"checkpoint-{last['step']}" / "trainer_state.json").is_file()


def test_generate_reports_progress_and_its_files(tmp_path, tiny_pipeline, uninterrupted):
    from dreambooth_singlora.generate import main

    main(["--adapter", str(uninterrupted), "--prompt", "a photo of sks dog", "--num_images_per_prompt", "2",
          "--num_inference_steps", "2", "--batch_size", "1", "--output_dir", str(tmp_path / "img"), "--events",
          str(tmp_path / "e.jsonl")])
    events = read_events(tmp_path / "e.jsonl")
    assert [e["event"] for e in events] == ["started", "progress", "progress", "finished"]
    assert [(e["done"], e["total"]) for e in events[1:3]] == [(1, 2), (2, 2)]
    assert all(Path(p).is_file() for p in events[-1]["outputs"])


def test_the_stream_survives_a_failing_consumer_and_ends_once(tmp_path):
    seen = []

    def broken(event):
        raise OSError("disk full")

    with job("x", tmp_path / "e.jsonl", consumers=[broken, seen.append]) as events:
        events.emit("progress", done=1, total=2)
        events.emit("stopped", step=1, resume="again")
    assert [e["event"] for e in seen] == ["progress", "stopped"]  # no 'finished' after the end
    assert [e["event"] for e in read_events(tmp_path / "e.jsonl")] == ["progress", "stopped"]
    with pytest.raises(ValueError, match="unknown event"):
        Events("x").emit("nonsense")


def test_a_reader_never_sees_half_a_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"event": "progress", "done": 1}\n{"event": "fin')
    assert read_events(path) == [{"event": "progress", "done": 1}]
    writer = JsonLines(path)
    path.write_text("")
    writer({"event": "finished", "time": 1.0, "job": "x"})
    assert [e["event"] for e in follow(path, timeout=5)] == ["finished"] and "finished" in ENDS
    writer.close()


def test_a_stale_stop_file_is_cleared_when_a_run_starts_but_not_one_made_while_it_starts(tmp_path):
    import time

    (tmp_path / "STOP").touch()
    os.utime(tmp_path / "STOP", (time.time() - 60, time.time() - 60))  # left by an earlier stop
    stop = StopRequest([tmp_path / "STOP"], since=time.time() - 5)  # this run's process started 5 s ago
    assert stop.requested() and stop.reason().startswith("stop file")
    stop.clear_files()
    assert not stop.requested()
    (tmp_path / "STOP").touch()  # asked for while the run loads its models: obeyed, not cleared
    stop.clear_files()
    assert stop.requested()
    stop.consume()
    assert not stop.requested() and not (tmp_path / "STOP").exists()


def test_follow_reads_on_past_an_earlier_jobs_end(tmp_path):
    """A resumed run appends to the same file: a reader goes on to the last job's end."""
    path = tmp_path / "e.jsonl"
    lines = [{"event": "started"}, {"event": "stopped", "step": 3}, {"event": "started"}, {"event": "step", "step": 4},
             {"event": "finished"}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert [e["event"] for e in follow(path, timeout=5)] == [e["event"] for e in lines]
    assert list(follow(path, timeout=0.5, from_end=True)) == []  # only what comes after


def test_an_exit_with_status_0_ends_the_stream_with_finished(tmp_path):
    with pytest.raises(SystemExit):
        with job("x", tmp_path / "e.jsonl"):
            raise SystemExit(0)
    with pytest.raises(SystemExit):
        with job("y", tmp_path / "f.jsonl"):
            raise SystemExit("error: something")
    assert read_events(tmp_path / "e.jsonl")[-1]["event"] == "finished"
    assert read_events(tmp_path / "f.jsonl")[-1] == {**read_events(tmp_path / "f.jsonl")[-1], "event": "failed",
                                                     "error": "error: something"}


def test_export_reports_its_file_or_its_error(tmp_path, uninterrupted, capsys):
    from dreambooth_singlora.export import main

    main(["--adapter", str(uninterrupted), "--output", str(tmp_path / "dog.safetensors"), "--events",
          str(tmp_path / "e.jsonl")])
    events = read_events(tmp_path / "e.jsonl")
    assert [e["event"] for e in events] == ["started", "finished"] and events[1]["outputs"] == [
        str(tmp_path / "dog.safetensors")] and (tmp_path / "dog.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "x.safetensors"), "--events",
              str(tmp_path / "f.jsonl")])
    failed = read_events(tmp_path / "f.jsonl")[-1]
    assert failed["event"] == "failed" and failed["error"] == capsys.readouterr().err.strip().splitlines()[-1]
