"""The UI's job queue: every job is a subprocess of the CLI, and all its state lives in the workspace.

    <workspace>/jobs/<id>/job.json      the command, its run, status, pid, times, error (written atomically)
    <workspace>/jobs/<id>/events.jsonl  the command's --events stream (dreambooth_singlora.events)
    <workspace>/jobs/<id>/log.txt       its stdout and stderr
    <workspace>/jobs/<id>/STOP          the trainer's --stop_file: the Stop button writes it

A runner thread starts queued jobs oldest first, one at a time on each GPU slot, each in its own session
(`start_new_session`), so closing the page or restarting the UI neither stops nor loses it: a restarted UI finds
a running job again by its pid (checked against the process's start time, so a reused pid is not taken for it)
and follows its events file. A job's end is read from its events (finished, failed with its one line, stopped),
else from its exit status and the last line of its log. One UI process at a time serves a workspace (a lock file).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError
from ..events import ENDS, read_events
from ..fileio import write_json_atomic

STATUSES = ("queued", "running", "finished", "failed", "stopped", "cancelled")
ACTIVE = ("queued", "running")


def cli(*args: str) -> list[str]:
    """The command line of a CLI command, run with this interpreter (`python -m dreambooth_singlora.cli ...`)."""
    return [sys.executable, "-m", "dreambooth_singlora.cli", *map(str, args)]


def accepts(argv: list, flag: str) -> bool:
    """Whether the CLI command of `argv` (as `cli` builds it) takes `flag`, read off its parser (no torch import):
    --events and --stop_file are passed only to the commands that have them."""
    import argparse
    import pkgutil

    from .. import cli as dispatch

    rest = [str(a) for a in argv[3:]]
    if not rest or rest[0] not in dispatch.HELP:
        return False
    parser = pkgutil.resolve_name(dispatch.HELP[rest[0]])()
    for action in parser._actions:  # a command with subcommands (eval score, ...): the subcommand's parser
        if isinstance(action, argparse._SubParsersAction) and len(rest) > 1 and rest[1] in action.choices:
            parser = action.choices[rest[1]]
    return flag in parser._option_string_actions


@dataclass
class Job:
    id: str
    kind: str                      # train, generate, export, eval
    argv: list                     # the command, without --events / --stop_file (added at start)
    run: str = ""                  # the run it belongs to (a folder of <workspace>/runs)
    title: str = ""
    status: str = "queued"
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    pid_start: float | None = None  # the process's start time: a pid reused by another process is not this job
    gpu: str | None = None
    returncode: int | None = None
    error: str = ""
    stop_requested: bool = False
    outputs: dict = field(default_factory=dict)  # what it writes, as paths relative to the workspace
    stop_file: bool = False         # the command takes --stop_file (the trainer)
    events: bool = True             # the command takes --events
    needs_gpu: bool = True          # False: starts at once, beside the GPU jobs (export)

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def process_start(pid: int) -> float | None:
    """The start time of process `pid` (None if there is none, or it is a zombie)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def last_error_line(log: Path) -> str:
    """The line a failed command printed last ('error: ...' if there is one): its one-line reason."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
                 .splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:500]


class Queue:
    """Jobs of one workspace. `submit`, `cancel`, `stop`, `resume`, `jobs`; `tick` starts and reaps (the runner
    thread calls it every `poll` seconds). `slots`: GPU ids (CUDA_VISIBLE_DEVICES of a job), None for one slot
    that leaves the environment as it is."""

    def __init__(self, workspace, slots=(None,), poll: float = 0.5, env: dict | None = None):
        self.workspace = Path(workspace).resolve()
        self.dir = self.workspace / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.slots = list(slots) or [None]
        self.poll, self.env = poll, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        self._lockfile = None

    # ---- on disk
    def job_dir(self, job_id: str) -> Path:
        return self.dir / job_id

    def events_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / "events.jsonl"

    def log_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / "log.txt"

    def save(self, job: Job) -> None:
        write_json_atomic(self.job_dir(job.id) / "job.json", asdict(job))

    def load(self, job_id: str) -> Job:
        path = self.job_dir(job_id) / "job.json"
        if "/" in job_id or job_id.startswith(".") or not path.is_file():
            raise UserError(f"no job {job_id!r} in {self.dir}")
        return Job.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def jobs(self, run: str | None = None, kind: str | None = None) -> list[Job]:
        """Every job, oldest first, optionally of one run and kind."""
        out = []
        for d in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if (d / "job.json").is_file():
                with suppress(ValueError, OSError, TypeError):
                    job = self.load(d.name)
                    if (run is None or job.run == run) and (kind is None or job.kind == kind):
                        out.append(job)
        return sorted(out, key=lambda j: (j.created, j.id))

    # ---- what the UI asks
    def submit(self, kind: str, argv: list, run: str = "", title: str = "", outputs: dict | None = None,
               needs_gpu: bool = True) -> Job:
        """Queue `argv` (a CLI command line); --events and --stop_file are added at start where it takes them."""
        with self.lock:
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(3)}"
            job = Job(id=job_id, kind=kind, argv=[str(a) for a in argv], run=run, title=title or kind,
                      created=time.time(), outputs=dict(outputs or {}), stop_file=accepts(argv, "--stop_file"),
                      events=accepts(argv, "--events"), needs_gpu=needs_gpu)
            self.job_dir(job_id).mkdir(parents=True)
            self.save(job)
            return job

    def cancel(self, job_id: str) -> Job:
        """Take a queued job off the queue (a running one is stopped instead: `stop`)."""
        with self.lock:
            job = self.load(job_id)
            if job.status != "queued":
                raise UserError(f"job {job_id} is {job.status}, not queued: only a queued job can be cancelled "
                                "(stop a running one)")
            job.status, job.ended = "cancelled", time.time()
            self.save(job)
            return job

    def stop(self, job_id: str) -> Job:
        """Ask a running job to stop: the trainer's stop file (it ends at its next step with a checkpoint), any
        other command, or a trainer asked a second time (e.g. still loading its model), SIGTERM to its process
        group (the trainer takes that as a stop request too). A queued job is cancelled."""
        with self.lock:
            job = self.load(job_id)
            if job.status == "queued":
                return self.cancel(job_id)
            if job.status != "running":
                raise UserError(f"job {job_id} is {job.status}: only a queued or running job can be stopped")
            again, job.stop_requested = job.stop_requested, True
            self.save(job)
            if job.stop_file and not again:
                (self.job_dir(job.id) / "STOP").write_text("stop requested from the web UI\n")
            elif job.pid and self._alive(job):
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.pid, signal.SIGTERM)
            return job

    def resume(self, job_id: str) -> Job:
        """Queue the same command again (the trainer resumes from its last checkpoint)."""
        job = self.load(job_id)
        if job.status in (*ACTIVE, "finished"):
            raise UserError(f"job {job_id} is {job.status}: only a stopped, failed or cancelled job can be resumed")
        return self.submit(job.kind, job.argv, job.run, job.title, job.outputs, job.needs_gpu)

    # ---- the runner
    def _alive(self, job: Job) -> bool:
        proc = self.procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        start = process_start(job.pid) if job.pid else None
        return start is not None and job.pid_start is not None and abs(start - job.pid_start) < 1.0

    def _finish(self, job: Job) -> None:
        proc = self.procs.pop(job.id, None)
        if proc is not None:
            job.returncode = proc.wait()
        ends = [e for e in read_events(self.events_path(job)) if e.get("event") in ENDS]
        if ends:
            job.status = ends[-1]["event"]
            job.error = ends[-1].get("error", "") if job.status == "failed" else ""
        elif job.stop_requested and job.returncode in (0, -signal.SIGTERM, None):
            # it ended by the stop (a clean exit, or the SIGTERM a second Stop sends); None: a restarted UI found
            # the process and cannot read its exit status. Any other end (SIGKILL, the OOM killer, a crash while
            # loading) is a failure, with the log's last line, even after a Stop.
            job.status = "stopped"
        elif job.returncode == 0:
            job.status = "finished"
        else:
            job.status = "failed"
            code = "" if job.returncode is None else f" (exit status {job.returncode})"
            job.error = (last_error_line(self.log_path(job)) or "the process ended without a word") + code
        job.ended = time.time()
        self.save(job)

    def _start(self, job: Job, gpu) -> None:
        d = self.job_dir(job.id)
        argv = [*job.argv, "--events", str(d / "events.jsonl")] if job.events else list(job.argv)
        if job.stop_file:
            (d / "STOP").unlink(missing_ok=True)
            argv += ["--stop_file", str(d / "STOP")]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        with open(d / "log.txt", "ab") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            try:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.workspace, env=env, start_new_session=True)
            except OSError as e:
                job.status, job.error, job.ended = "failed", f"cannot start {argv[0]}: {e}", time.time()
                self.save(job)
                return
        self.procs[job.id] = proc
        job.status, job.started, job.pid, job.gpu = "running", time.time(), proc.pid, gpu
        job.pid_start = process_start(proc.pid) or time.time()
        self.save(job)

    def tick(self) -> None:
        """One pass: record the end of jobs whose process is gone, then start queued jobs on free slots."""
        with self.lock:
            jobs = self.jobs()
            busy = set()
            for job in jobs:
                if job.status == "running":
                    if self._alive(job):
                        if job.needs_gpu:
                            busy.add(job.gpu)
                    else:
                        self._finish(job)
            for job in (j for j in jobs if j.status == "queued"):
                if not job.needs_gpu:
                    self._start(job, None)
                    continue
                free = [s for s in self.slots if s not in busy]
                if not free:
                    continue
                self._start(job, free[0])
                busy.add(free[0])

    def claim(self) -> None:
        """Take the workspace's lock: one UI process runs the queue of a workspace. UserError if another does."""
        f = open(self.workspace / ".ui.lock", "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"another web UI (pid {holder}) serves the workspace {self.workspace}: "
                            "stop it, or give another --workspace") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._lockfile = f

    def start(self) -> "Queue":
        """Claim the workspace and start the runner thread (a daemon: the jobs outlive the UI)."""
        self.claim()

        def loop():
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception as e:  # noqa: BLE001 - the runner must survive one bad job folder
                    print(f"job runner: {type(e).__name__}: {e}", file=sys.stderr)
                self._stop.wait(self.poll)

        self._thread = threading.Thread(target=loop, name="job-runner", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def wait(self, job_id: str, timeout: float = 120.0) -> Job:
        """Tick until the job has ended (tests and scripts); TimeoutError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._thread is None:
                self.tick()
            job = self.load(job_id)
            if job.status not in ACTIVE:
                return job
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {self.load(job_id).status} after {timeout} s")
