"""What long jobs report, and who listens: one stream of typed events out of training, generating and evaluation.

A job emits events through an `Events` object; its consumers turn them into what a person or another process
reads. Consumers here: the tqdm bar (`Bar`), the log (`LogLines`), tensorboard (`Tracker`, through accelerate) and
`--events FILE` (`JsonLines`: one JSON object per line, each line written whole and flushed, so another process
can follow a live run by reading the file):

    {"event": "started", "time": 1765150000.1, "job": "train", "family": "sd1", "config": {...}}
    {"event": "step", "time": ..., "job": "train", "step": 10, "total": 400, "loss": {"dog": 0.1},
     "lr": 0.0001, "u": 0.25, "it_per_s": 48.1, "eta_s": 8.1}
    {"event": "checkpoint", "time": ..., "job": "train", "step": 100, "path": "out/checkpoints/checkpoint-100"}
    {"event": "validation", "time": ..., "job": "train", "step": 100, "paths": ["out/validation/step-00100.png"]}
    {"event": "saved", "time": ..., "job": "train", "subject": "dog", "path": "out"}
    {"event": "progress", "time": ..., "job": "generate", "done": 8, "total": 100, "unit": "image"}
    {"event": "finished", "time": ..., "job": "train", "outputs": ["out"]}
    {"event": "failed", "time": ..., "job": "train", "error": "error: ... (one line)"}
    {"event": "stopped", "time": ..., "job": "train", "step": 37, "checkpoint": "...", "resume": "the same command"}

Every job's stream ends with exactly one of finished, failed or stopped. Follow a run from a shell with
`tail -f run.jsonl`, or from Python with `follow(path)`.

A stop request (`StopRequest`) comes in by SIGINT / SIGTERM or a stop file; the trainer asks it at each step
boundary and ends with a checkpoint, the event `stopped` and exit status 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

KINDS = ("started", "step", "checkpoint", "validation", "saved", "progress", "finished", "failed", "stopped")
ENDS = ("finished", "failed", "stopped")
#: the stop file a run looks for in its output folder (besides --stop_file)
STOP_NAME = "STOP"

logger = logging.getLogger("dreambooth_singlora.events")


def _plain(value):
    """A JSON-safe copy: paths as text, tuples as lists, non-finite floats as null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


class Events:
    """The stream of one job: `emit(kind, **fields)` hands one event to every consumer (a callable taking the
    event dict). A consumer that fails (a full disk under --events) is dropped with a warning, never the job."""

    def __init__(self, job: str, consumers=()):
        self.job, self.consumers, self.ended = job, list(consumers), None

    def add(self, consumer) -> None:
        self.consumers.append(consumer)

    def emit(self, kind: str, **fields) -> dict:
        if kind not in KINDS:
            raise ValueError(f"unknown event {kind!r}; valid: {', '.join(KINDS)}")
        event = {"event": kind, "time": round(time.time(), 3), "job": self.job, **_plain(fields)}
        if kind in ENDS:
            if self.ended is not None:
                return event  # one end per job: a failure after `stopped` is not a second end
            self.ended = kind
        for consumer in list(self.consumers):
            try:
                consumer(event)
            except Exception as e:  # noqa: BLE001 - observers never break the job they observe
                logger.warning("dropping an event consumer (%s: %s)", type(e).__name__, e)
                self.consumers.remove(consumer)
        return event

    def close(self) -> None:
        for consumer in self.consumers:
            with suppress(Exception):
                getattr(consumer, "close", lambda: None)()
        self.consumers = []


def main_process() -> bool:
    """Whether this is the run's main process: accelerate's answer once its state exists; before that (bad input
    found before the accelerator is made), the rank that accelerate's and torch's launchers give each process."""
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return PartialState().is_main_process
    return os.environ.get("RANK", "0") == "0"


class JsonLines:
    """`--events FILE`: each event one JSON line, appended, written with one write call and flushed (and fsynced
    when it ends the job), so a reader never sees half a line. Only the main process writes."""

    def __init__(self, path):
        self.path, self.file = Path(path), None

    def __call__(self, event: dict) -> None:
        if not main_process():
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.file.write(json.dumps(event, sort_keys=False) + "\n")
        self.file.flush()
        if event["event"] in ENDS:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class LogLines:
    """The events a person wants in the log that the bar does not show (checkpoints, saved adapters, the end)."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter):
        self.log = log

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "checkpoint":
            self.log.info("checkpoint of step %d saved in %s", event["step"], event["path"])
        elif kind == "validation":
            self.log.info("validation images of step %d: %s", event["step"], ", ".join(event["paths"]))
        elif kind == "stopped":
            self.log.info("stopped at step %d (%s); %s", event["step"], event.get("checkpoint") or "no checkpoint",
                          event["resume"])


class Bar:
    """The tqdm progress bar as a consumer: `step` and `progress` events move it; the end closes it."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "step":
            self.bar.update(event["step"] - self.bar.n)
            if event.get("loss"):
                losses = [v for v in event["loss"].values() if v is not None]
                if losses:
                    self.bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", lr=f"{event['lr']:.2e}",
                                         u=f"{event['u']:.2f}", refresh=False)
        elif kind == "progress":
            self.bar.update(event["done"] - self.bar.n)
        elif kind in ENDS:
            self.bar.close()

    def close(self) -> None:
        self.bar.close()


class Tracker:
    """tensorboard (or any accelerate tracker) as a consumer: the mean loss, lr and u of each logged step, and each
    subject's loss when several train together."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, event: dict) -> None:
        if event["event"] != "step" or not event.get("loss"):
            return
        losses = {k: v for k, v in event["loss"].items() if v is not None}
        values = {"loss": sum(losses.values()) / max(1, len(losses)), "lr": event["lr"], "u": event["u"]}
        if len(losses) > 1:
            values.update({f"loss/{k}": v for k, v in losses.items()})
        self.accelerator.log(values, step=event["step"])


def one_line(error: BaseException) -> str:
    """The one line a failed job reports: the UserError's message, or the exception's type and first line."""
    from .errors import UserError, first_line

    text = first_line(error)
    return f"error: {text}" if isinstance(error, UserError) else \
        (text if text == type(error).__name__ else f"{type(error).__name__}: {text}")


@contextmanager
def job(name: str, events_file=None, consumers=()) -> Iterator[Events]:
    """The events of one job for the `with` block: `--events FILE` (JSON lines) among the consumers when given,
    `failed` with the error's one line if the block raises, `finished` if it returns without an end event of its
    own."""
    events = Events(name, consumers)
    if events_file:
        events.add(JsonLines(events_file))
    try:
        yield events
    except SystemExit as e:
        if e.code in (0, None):
            events.emit("finished")
        else:
            events.emit("failed", error=e.code if isinstance(e.code, str) else f"exit status {e.code}")
        raise
    except BaseException as e:
        events.emit("failed", error="interrupted" if isinstance(e, KeyboardInterrupt) else one_line(e))
        raise
    else:
        events.emit("finished")
    finally:
        events.close()


def follow(path, poll: float = 0.2, timeout: float | None = None, from_end: bool = False) -> Iterator[dict]:
    """The events of `path` as another process writes them, up to and including the end (finished, failed or
    stopped) of the last job in it: what a UI or a script reads to follow a live run. A file that a resumed run
    appended to holds several jobs: an end that more lines follow is passed on, not stopped at. `from_end`: only
    what is written from now on (a run about to be started again on the same file). Waits for the file."""
    path, start, buf = Path(path), time.monotonic(), ""
    while not path.exists():
        if timeout is not None and time.monotonic() - start > timeout:
            return
        time.sleep(poll)
    with open(path, encoding="utf-8") as f:
        if from_end:
            f.seek(0, os.SEEK_END)
        ended = False
        while True:
            chunk = f.readline()
            if chunk:
                buf += chunk
                if not buf.endswith("\n"):
                    continue  # a line still being written
                event, buf = json.loads(buf), ""
                yield event
                ended = event["event"] in ENDS
            elif ended:
                return  # the last job's end, nothing after it
            elif timeout is not None and time.monotonic() - start > timeout:
                return
            else:
                time.sleep(poll)


def read_events(path) -> list[dict]:
    """Every complete event line of `path` (a line still being written is left out)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


class StopRequest:
    """A request from outside to stop a run at its next step boundary: SIGINT or SIGTERM (while `watching`), or one
    of the stop files existing. A second SIGINT interrupts at once, as Ctrl-C always did."""

    def __init__(self, files=(), since: float | None = None):
        self.files = [Path(f) for f in files if f]
        self.signalled = None
        self.since = time.time() if since is None else since  # when the run's process started

    def clear_files(self) -> None:
        """Remove stale stop files, made before this run's process started (an earlier stop): a new run of the same
        command goes on; a stop requested while this run was starting still stops it."""
        for f in self.files:
            with suppress(FileNotFoundError):
                if f.stat().st_mtime < self.since:
                    f.unlink()

    def consume(self) -> None:
        """Remove the stop files once obeyed (the stop is done; they would stop the next run)."""
        for f in self.files:
            with suppress(FileNotFoundError):
                f.unlink()

    def requested(self) -> bool:
        return self.signalled is not None or any(f.exists() for f in self.files)

    def reason(self) -> str:
        if self.signalled is not None:
            return signal.Signals(self.signalled).name
        return next((f"stop file {f}" for f in self.files if f.exists()), "")

    @contextmanager
    def watching(self):
        """SIGINT and SIGTERM request a stop inside the block (main thread only; elsewhere the signals are left
        as they are)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.signalled is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.signalled = signum
            logger.warning("%s received: stopping at the next step boundary with a checkpoint (Ctrl-C again to "
                           "interrupt at once)", signal.Signals(signum).name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
