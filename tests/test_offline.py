"""The base-model check asks the hub client, so HF_ENDPOINT mirrors, proxies and HF_HUB_OFFLINE count as they do
for the download itself. No real network: the "hub" is a tiny HTTP server on 127.0.0.1 started here.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import: each case runs the check in a fresh
Python process with its own environment (and an empty cache), as a user's command would.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

MODEL = "someone/some-model"
CHECK = """
import json, sys, time
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.fileio import check_base_model
t = time.perf_counter()
try:
    check_base_model(sys.argv[1])
    out = {"ok": True}
except UserError as e:
    out = {"ok": False, "error": str(e)}
out["seconds"] = time.perf_counter() - t
print(json.dumps(out))
"""


class FakeHub(BaseHTTPRequestHandler):
    """Answers the model-info request for MODEL (404 for any other model), and records the URLs asked for: a path,
    or a whole URL when it is asked as a proxy."""

    asked: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        FakeHub.asked.append(self.path)
        path = "/" + self.path.split("://", 1)[1].split("/", 1)[1] if "://" in self.path else self.path
        if path.split("?")[0] == f"/api/models/{MODEL}":
            body = json.dumps({"id": MODEL, "modelId": MODEL, "sha": "0" * 40, "private": False,
                               "siblings": [{"rfilename": "model_index.json"}]}).encode()
            self.send_response(200)
        else:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(tmp_path, model=MODEL, **env):
    """Run check_base_model(model) in a fresh process with `env` and an empty hub cache; its JSON result."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    base.update(HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                HF_HUB_DISABLE_TELEMETRY="1", **env)
    r = subprocess.run([sys.executable, "-c", CHECK, model], capture_output=True, text=True, timeout=120, env=base)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_mirror_in_hf_endpoint_is_asked_not_huggingface_co(fake_hub, tmp_path):
    FakeHub.asked.clear()
    out = check(tmp_path, HF_ENDPOINT=fake_hub, HF_HUB_OFFLINE="0")
    assert out["ok"], out
    assert any(p.startswith(f"/api/models/{MODEL}") for p in FakeHub.asked)


def test_proxy_is_used(fake_hub, tmp_path):
    """A hub behind a proxy: the host name does not resolve here (.invalid), only the proxy knows the way."""
    FakeHub.asked.clear()
    out = check(tmp_path, HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=fake_hub, http_proxy=fake_hub,
                HF_HUB_OFFLINE="0")
    assert out["ok"], out
    assert any(p.startswith(f"http://hub.invalid/api/models/{MODEL}") for p in FakeHub.asked)


def test_model_missing_on_the_mirror_is_named(fake_hub, tmp_path):
    out = check(tmp_path, model="someone/no-such-model", HF_ENDPOINT=fake_hub, HF_HUB_OFFLINE="0")
    assert not out["ok"] and "someone/no-such-model" in out["error"] and fake_hub in out["error"]
    assert "--pretrained_model_name_or_path" in out["error"]


def test_hf_hub_offline_fails_at_once(fake_hub, tmp_path):
    FakeHub.asked.clear()
    out = check(tmp_path, HF_ENDPOINT=fake_hub, HF_HUB_OFFLINE="1")
    assert not out["ok"]
    assert out["error"].startswith(f"HF_HUB_OFFLINE is set and {MODEL} is not in the local cache")
    assert "--pretrained_model_name_or_path" in out["error"]
    assert FakeHub.asked == []  # offline means no request at all
    assert out["seconds"] < 5  # the check itself: no network, no retries (minutes, were the hub retried)


def test_unreachable_hub_fails_at_once_naming_it(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    out = check(tmp_path, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0")
    assert not out["ok"]
    assert out["error"].startswith(f"no network to the model hub ({endpoint}")
    assert f"{MODEL} is not in the local cache" in out["error"] and "--pretrained_model_name_or_path" in out["error"]
    # a refused connection answers at once; 5 s leaves room for a loaded 2-core machine, far below any retry loop
    assert out["seconds"] < 5
