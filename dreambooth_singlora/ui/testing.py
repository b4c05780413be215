"""The UI's test helpers: start `dreambooth-singlora ui` as a subprocess on a free loopback port and wait for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(workspace, *flags, timeout: float = 90.0, env=None):
    """The UI on a free loopback port, serving `workspace`: yields its URL; ended (SIGTERM, then SIGKILL) after.
    Its output goes to <workspace>/../ui-<port>.log."""
    port = free_port()
    log_path = Path(workspace).resolve().parent / f"ui-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dreambooth_singlora.cli", "ui", "--workspace", str(workspace),
                                 "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the UI exited with status {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # up, behind its login
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"the UI did not answer within {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
