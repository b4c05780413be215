"""The web UI end to end over HTTP: `dreambooth-singlora ui` in a subprocess on a free loopback port, driven with
gradio_client as a browser would drive it: a 2-step training job on the tiny pipeline followed to its end (its
validation grid served), the adapter exported (generating runs through the same job machinery:
tests/test_ui_handlers.py); Gradio's file serving limited to the workspace; a restarted UI lists the same run."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from gradio_client import Client, handle_file  # the [test] extra installs it: missing, the module fails

from dreambooth_singlora.ui.testing import running_app


def follow(client, api, job_id, timeout=180):
    """Call a view endpoint until its status line says the job ended; the last answer."""
    end = time.monotonic() + timeout
    while True:
        out = client.predict(job_id, api_name=api)
        status = out[0]
        if any(f": {s}" in status for s in ("finished", "failed", "stopped", "cancelled")):
            return out
        assert time.monotonic() < end, status
        time.sleep(0.5)


def value(update):
    """A component's value out of what an endpoint returned (a dropdown comes back as its update)."""
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Served:
    """The module's one UI process: workspace, URL, client; `close()` ends it (the restart test)."""

    def __init__(self, ws):
        self.ws, self.stack = ws, ExitStack()
        self.url = self.stack.enter_context(running_app(ws))
        self.client = Client(self.url, verbose=False)

    def __iter__(self):
        return iter((self.ws, self.url, self.client))

    def close(self):
        self.stack.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_pipeline, dataset_dir):
    app = Served(tmp_path_factory.mktemp("ui-http") / "ws")
    yield app
    app.close()


def start_train(client, tiny_pipeline, photos, run="dog-http", steps=2):
    return client.predict(run, "", "", [handle_file(str(p)) for p in photos], "dog", "sks", str(tiny_pipeline),
                          "singlora", 4, steps, 1e-4, False, 32, "a sks dog", "none", "none", "",
                          api_name="/start_train")


def test_train_and_export_over_http(served, tiny_pipeline, dataset_dir):
    ws, url, client = served
    photos = sorted(Path(dataset_dir, "dog").glob("*.jpg"))[:3]
    out = start_train(client, tiny_pipeline, photos)
    assert out[0].startswith("Queued training of run dog-http"), out[0]
    job_id = value(out[1])
    status, loss, lr, u, validation, log = follow(client, "/live", job_id)
    assert status.startswith(f"train dog-http [{job_id}]: finished; step 2/2"), (status, log)
    assert loss["columns"] == ["step", "loss", "subject"] and loss["data"][-1][:1] == [2]
    assert lr["columns"] == ["step", "lr"] and lr["data"] == [[2, 1e-4]]  # constant lr: --learning_rate 1e-4
    assert u["columns"] == ["step", "u"] and u["data"][0][0] == 2 and 0 < u["data"][0][1] <= 1
    events = [json.loads(x) for x in (ws / "jobs" / job_id / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][0] == "started" and events[-1]["event"] == "finished"
    assert (ws / "runs" / "dog-http" / "adapter" / "adapter_model.safetensors").is_file()
    # the validation grid of step 2 and its images, served and downloaded
    assert Path(validation[0]["image"]).name == "step-00002.png" and Path(validation[0]["image"]).is_file()
    assert {v["caption"] for v in validation} == {"step 2"}

    msg, lora = client.predict("dog-http", "diffusers", api_name="/export")
    assert msg.startswith("Exported dog-http as a diffusers LoRA"), msg
    assert (ws / "runs" / "dog-http" / "exports" / "dog-http-diffusers.safetensors").is_file()
    assert Path(lora).read_bytes() == (ws / "runs" / "dog-http" / "exports" / "dog-http-diffusers.safetensors"
                                       ).read_bytes()  # the download is the file

    queue = client.predict(api_name="/queue")["data"]
    assert sorted(row[1] for row in queue) == ["export", "train"]
    assert all(row[3] == "finished" for row in queue)


def test_http_refusals(served, tiny_pipeline, dataset_dir, tmp_path):
    ws, url, client = served
    # Gradio serves the workspace only: not a file outside it, not the jobs' command lines
    assert http_status(url + "gradio_api/file=/etc/passwd") == 403
    assert http_status(url + f"gradio_api/file={tiny_pipeline}/model_index.json") == 403
    assert http_status(url + f"gradio_api/file={ws}/../{Path(ws).parent.name}/x") in (403, 404)
    (ws / "jobs").mkdir(exist_ok=True)
    (ws / "jobs" / "probe.txt").write_text("x")
    assert http_status(url + f"gradio_api/file={ws}/jobs/probe.txt") == 403
    # an upload that is not an image: refused in the page, no run folder kept
    fake = tmp_path / "photo.jpg"
    fake.write_text("not an image")
    photos = sorted(Path(dataset_dir, "dog").glob("*.jpg"))[:2]
    out = start_train(client, tiny_pipeline, [*photos, fake], run="bad-upload")
    assert out[0] == "Refused: photo.jpg is not an image this tool can read: upload photos (JPEG, PNG, WebP, ...)"
    assert not (ws / "runs" / "bad-upload").exists()
    # a path typed into the UI that leaves the workspace
    msg, _ = client.predict("../../etc", "kohya", api_name="/export")
    assert msg.startswith("Refused: run name '../../etc' is not allowed")


def test_other_hosts_are_refused_without_a_login(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dreambooth_singlora.cli", "ui", "--workspace", str(tmp_path / "w"),
                        "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --host 0.0.0.0 would let other machines reach the UI")
    assert not (tmp_path / "w").exists()


def test_a_restarted_ui_lists_the_same_run(served):
    """Runs last in the module: ends the shared UI. A second UI on a served workspace is refused; once the first
    ends, a new one (behind a login this time: refused without it and with a wrong password) lists the run the
    first trained."""
    with pytest.raises(RuntimeError, match="another web UI .* serves the workspace"):
        with running_app(served.ws):
            pass
    served.close()
    logins = served.ws.parent / "logins.txt"
    logins.write_text("ann:correct horse\n")
    with running_app(served.ws, "--auth_file", str(logins)) as url:  # restarted, now behind a login
        assert http_status(url + "config") == 401
        with pytest.raises(ValueError, match="Could not login"):  # Gradio answers 400 "Incorrect credentials"
            Client(url, verbose=False, auth=("ann", "wrong"))
        rows = Client(url, verbose=False, auth=("ann", "correct horse")).predict(api_name="/runs")["data"]
    assert [r[:2] for r in rows] == [["dog-http", "finished"]]
