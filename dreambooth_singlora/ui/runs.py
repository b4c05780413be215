"""What the UI shows of a job and a run, read from the workspace: the job's events file (steps, losses, lr, u(t),
validation images, the end) and the run's folder (settings, model card, files). Nothing here writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..events import read_events
from .jobs import Job, Queue
from .paths import within


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = int(round(float(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress(queue: Queue, job: Job) -> dict:
    """The job's live state from its events: step, total, it/s, ETA, the loss of each subject at every logged step,
    lr and u(t), validation images (those inside the workspace), the last event."""
    events = read_events(queue.events_path(job)) if job.events else []
    steps = [e for e in events if e.get("event") == "step"]
    last = steps[-1] if steps else {}
    # one adapter's loss is named after its folder ('adapter' in a run of the UI): shown under the run's name
    name = (lambda k: job.run or k) if all(len(e.get("loss") or {}) <= 1 for e in steps) else (lambda k: k)
    loss = [{"step": e["step"], "loss": v, "subject": name(k)} for e in steps
            for k, v in (e.get("loss") or {}).items() if v is not None]
    sched = [{"step": e["step"], "value": e[k], "series": k} for e in steps for k in ("lr", "u")
             if e.get(k) is not None]
    validation = []
    for e in events:
        if e.get("event") == "validation":
            for p in e.get("paths") or []:
                try:
                    validation.append((str(within(queue.workspace, p)), f"step {e.get('step')}"))
                except ValueError:
                    continue
    prog = [e for e in events if e.get("event") == "progress"]
    return {"step": last.get("step"), "total": last.get("total"), "it_per_s": last.get("it_per_s"),
            "eta_s": last.get("eta_s"), "loss": loss, "sched": sched, "validation": validation,
            "done": prog[-1].get("done") if prog else None, "of": prog[-1].get("total") if prog else None,
            "last": events[-1]["event"] if events else None, "n_events": len(events)}


def status_line(job: Job, prog: dict | None = None) -> str:
    """One line: what the job is doing or how it ended."""
    line = f"{job.title or job.kind} [{job.id}]: {job.status}"
    if job.status == "failed" and job.error:
        line += f": {job.error}"
    if prog:
        if prog.get("step") is not None:
            line += (f"; step {prog['step']}/{prog['total']}, {prog['it_per_s'] or 0:.2f} it/s, "
                     f"ETA {fmt_seconds(prog['eta_s'])}")
        elif prog.get("done") is not None:
            line += f"; {prog['done']}/{prog['of']} done"
    if job.status == "running" and job.stop_requested:
        line += " (stop requested)"
    return line


def log_tail(queue: Queue, job: Job, lines: int = 40) -> str:
    try:
        text = queue.log_path(job).read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def run_names(workspace) -> list[str]:
    d = Path(workspace) / "runs"
    return sorted((p.name for p in d.iterdir() if (p / "run.json").is_file()), reverse=False) if d.is_dir() else []


def run_status(queue: Queue, run: str) -> tuple[str, str]:
    """(status, error) of a run: its latest training job's."""
    jobs = queue.jobs(run=run, kind="train")
    if not jobs:
        return "no job", ""
    return jobs[-1].status, jobs[-1].error


def runs_table(queue: Queue) -> list[list]:
    """One row per run: name, status, error, method, steps, base model, created."""
    rows = []
    for name in run_names(queue.workspace):
        try:
            s = json.loads((queue.workspace / "runs" / name / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        status, error = run_status(queue, name)
        rows.append([name, status, error, s.get("prompt", ""), s.get("method", ""), s.get("steps", ""),
                     s.get("base_model", ""), time.strftime("%Y-%m-%d %H:%M", time.localtime(s.get("created", 0)))])
    return rows


def run_files(queue: Queue, run: str, limit: int = 200) -> list[str]:
    """The run's own files as paths inside the workspace: settings, photos, the adapter and its model card,
    validation grids, exports, downloads, eval reports. Not the checkpoints, nor the generated images one by one
    (the Generate tab shows those, and its zip holds them)."""
    root = queue.workspace / "runs" / run
    skip = {"checkpoints", "images", "logs"}
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return [str(p) for p in files[:limit]]


def model_card(queue: Queue, run: str) -> str:
    """The adapter folder's README.md, less its YAML front matter (the model hub's metadata, not for reading)."""
    card = queue.workspace / "runs" / run / "adapter" / "README.md"
    if not card.is_file():
        return "(no model card yet: it is written when the adapter is saved)"
    text = card.read_text(encoding="utf-8")
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        text = text[4:].split("\n---\n", 1)[1]
    return text.lstrip()


def gallery(folder: Path) -> list[tuple[str, str]]:
    """(image, 'prompt - seed N') of a generate output folder, from its index.json."""
    index = folder / "index.json"
    if not index.is_file():
        return []
    data = json.loads(index.read_text(encoding="utf-8"))
    out = []
    for rec in data.get("images", []):
        path = folder / rec["file"]
        if path.is_file():
            out.append((str(path), f"{rec['prompt']} - seed {rec['seed']}"))
    return out
