"""The Table 3 driver and its trainer processes, with fake trainers (tiny python scripts that sleep, fail or
ignore SIGTERM): a failed trainer stops the others (SIGTERM, SIGKILL after the grace period) and the driver
waits for them and closes their logs before it exits; a failed render launch ends with one line; a run folder
held by a live process is refused, a stale lock taken over (by one of two takers at once), and an unreadable
lock is held until it is old."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_singlora.errors import UserError
from dreambooth_singlora.eval import lock as L
from dreambooth_singlora.eval import table3 as T
from dreambooth_singlora.eval.lock import LOCK_NAME, FolderLock, alive

SLEEPER = """import os, signal, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60)
"""
FAILS = "import sys, time; time.sleep(1.0); sys.exit(3)"  # after the sleeper has started (a loaded machine)


def args_for(tmp_path, gpus=(0, 1), grace=5.0):
    return SimpleNamespace(work_dir=tmp_path / "work", multi_subject=False, max_train_steps=2, gpus=list(gpus),
                           stop_grace=grace)


def fake_trainers(monkeypatch, tmp_path, sleeper_mode="plain"):
    """dog: a trainer that sleeps (its pid in tmp/pid); cat: one that fails after half a second."""
    def command(args, run, subjects, one_subject=False):
        if subjects[0] == "dog":
            return [sys.executable, "-c", SLEEPER, str(tmp_path / "pid"), sleeper_mode]
        return [sys.executable, "-c", FAILS]
    monkeypatch.setattr(T, "train_command", command)


def open_logs() -> list:
    fds = Path("/proc/self/fd")
    return [p for p in (os.readlink(f) for f in fds.iterdir() if f.exists()) if p.endswith("train.log")]


@pytest.mark.parametrize("mode", ["plain", "ignore"])
def test_a_failed_trainer_stops_the_others(tmp_path, monkeypatch, capsys, mode):
    fake_trainers(monkeypatch, tmp_path, mode)
    run = T.Run("lora_r8", "lora", 8, 0, "lora_r8")
    grace = 0.5
    start = time.monotonic()
    with pytest.raises(SystemExit, match=r"lora_r8 / cat failed \(exit 3\)"):
        T.train_all(args_for(tmp_path, grace=grace), [run], ["dog", "cat"])
    pid = int((tmp_path / "pid").read_text())
    assert not alive(pid)  # stopped and waited for (reaped): no trainer left writing
    assert open_logs() == []  # every log file closed
    assert not (tmp_path / "work" / "adapters" / "lora_r8" / LOCK_NAME).exists()  # the lock released
    assert "stopping the trainers still running (lora_r8 / dog)" in capsys.readouterr().out
    # SIGTERM ends the plain sleeper at once; the one that ignores it is killed after the grace period
    assert time.monotonic() - start < 30


def test_a_folder_held_by_a_live_process_is_refused_and_a_stale_lock_taken_over(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(T, "train_command", lambda *a, **k: [sys.executable, "-c", "pass"])
    run = T.Run("lora_r8", "lora", 8, 0, "lora_r8")
    folder = tmp_path / "work" / "adapters" / "lora_r8"
    folder.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another driver's trainer
    try:
        (folder / LOCK_NAME).write_text(json.dumps({"pids": [999_999_999, other.pid]}))
        with pytest.raises(UserError, match=f"in use by process {other.pid}"):
            T.train_all(args_for(tmp_path, gpus=()), [run], ["dog"])
        assert not (folder / "dog" / "train.log").exists()  # nothing was started
    finally:
        other.kill()
        other.wait()
    caplog.set_level("WARNING")
    T.train_all(args_for(tmp_path, gpus=()), [run], ["dog"])  # every holder gone: stale, taken over
    assert "taking over the stale lock" in caplog.text and not (folder / LOCK_NAME).exists()


def test_lock_records_the_trainers_and_nests(tmp_path):
    with FolderLock(tmp_path / "a") as lock:
        with FolderLock(tmp_path / "a"):  # the same process again: held, not refused
            FolderLock.add_pid(12345)
        held = json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pids"]
        assert held == [os.getpid(), 12345] and lock.pids == held
    assert not (tmp_path / "a" / LOCK_NAME).exists()


def test_run_trainer_records_its_pid_and_reports_failure(tmp_path):
    with FolderLock(tmp_path / "r"):
        with pytest.raises(SystemExit, match="exit 3"):
            T.run_trainer([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ))
        assert len(json.loads((tmp_path / "r" / LOCK_NAME).read_text())["pids"]) == 2


def test_a_failed_render_launch_is_one_line(tmp_path, monkeypatch):
    launched = []

    def command(args, run, todo):
        launched.append(todo)
        return [sys.executable, "-c", "import sys; sys.exit(4)"]
    monkeypatch.setattr(T, "render_command", command)
    args = SimpleNamespace(work_dir=tmp_path / "work", gpus=[0, 1], max_prompts=1, num_images_per_prompt=1)
    run = T.Run("lora_r8", "lora", 8, 0, "lora_r8")
    with pytest.raises(SystemExit, match=r"^\[render\] lora_r8 failed \(exit 4\); .*rendered subjects are kept"):
        T.render_all(args, [run], ["dog", "cat"])
    assert launched == [["dog", "cat"]]


def test_an_unreadable_lock_is_held_until_it_is_old(tmp_path, caplog):
    """An empty lock (what an older version left between creating and writing it) is not stale at once."""
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")
    with pytest.raises(UserError, match="unreadable and 0 s old"):
        with FolderLock(tmp_path):
            pass
    assert lock.read_bytes() == b""  # left in place
    old = time.time() - L.UNREADABLE_STALE_S - 1
    os.utime(lock, (old, old))
    caplog.set_level("WARNING")
    with FolderLock(tmp_path):
        assert json.loads(lock.read_text())["pids"] == [os.getpid()]
    assert "taking over the stale lock" in caplog.text and not lock.exists()


def test_two_takers_of_one_stale_lock_one_wins(tmp_path, monkeypatch):
    """Both read the dead holder before either acts (the barrier, and a slow liveness check to widen the window):
    exactly one takes the folder, the other is refused because the winner holds it now."""
    real_alive = L.alive

    def slow_alive(pid):
        time.sleep(0.05)
        return real_alive(pid)
    monkeypatch.setattr(L, "alive", slow_alive)
    lock = tmp_path / LOCK_NAME
    for _ in range(5):
        lock.write_text(json.dumps({"pids": [999_999_999]}))
        barrier = threading.Barrier(2)
        results = []

        def take():
            taker = FolderLock(tmp_path)
            barrier.wait()
            try:
                taker._take()  # the file protocol (FolderLock's own nesting would let a second thread in)
                results.append("took")
            except UserError as e:
                results.append(str(e))
        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 2 and results.count("took") == 1, results
        assert f"in use by process {os.getpid()}" in [r for r in results if r != "took"][0]
        assert json.loads(lock.read_text())["pids"] == [os.getpid()]
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no file left aside
        lock.unlink()
