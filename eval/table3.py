"""Reproduce the SingLoRA paper's Table 3 (DreamBooth on SD1.5): train, render, score, compare.

    dreambooth-singlora eval table3 --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_dir dreambooth/dataset --work_dir table3 --gpus 0 1 2 3 --seeds 3
    dreambooth-singlora eval table3 ... --rows lora_r8 singlora_r8 singlora_r8_noramp   # an ablation row
    dreambooth-singlora eval table3 ... --rows_file rows.json                           # rows of your own

(`python -m dreambooth_singlora.eval table3`; `python scripts/reproduce_table3.py` from a checkout.)

Rows are data (`Row`: name, method, rank and optionally learning rate, ramp T, init, target modules; a field
left out is the trainer's default). The default rows are the paper's five: LoRA r8, LoRA+ r8, DoRA r8, SingLoRA
r8, SingLoRA r16, all on the UNet's to_q/to_k. Named optional rows (--rows NAME ...): singlora_r8_noramp
(ramp_steps 0), singlora_r8_rankinit (--init rank), singlora_r8_qkvo (to_q to_k to_v to_out.0). --rows_file
reads rows from a JSON list of objects or a CSV with a header (docs/EVAL.md). Every row is compared with
lora_r8, subject by subject, when lora_r8 is among the rows. Choices this tool makes where the paper is
ambiguous (docs/EVAL.md, docs/PROTOCOL.md): the instance prompt is "a photo of sks <class>" (the paper writes
"a photo of a sks <class>": --instance_prompt_template "a photo of a {identifier} {cls}" gives that reading,
one trainer process per subject) and "400 iterations" are 400 optimizer steps at batch 1 (--max_train_steps),
not 400 epochs.

Runs: every (row, seed) is one run, seeds --seed .. --seed + --seeds - 1. The first seed's run keeps
the layout of a one-seed work dir (<work>/adapters/<row>/), each further seed is a sibling run
<row>_seed<k> (<work>/adapters/<row>_seed<k>/), so a one-seed work dir resumes and extends to more
seeds without retraining. Stages, each resumable (rerun the same command after any interruption):
1. train  <work>/adapters/<run>/<subject>/  one trainer process per (run, subject), up to one per GPU
          at a time (--gpus); an interrupted subject resumes from its last checkpoint; with
          --multi_subject the SingLoRA, LoRA and LoRA+ runs each train all their subjects in one
          batched run (DoRA stays one subject at a time). A run's folder is held by a lock file
          (<work>/adapters/<run>/.lock, the driver's and its trainers' pids): a second driver started on
          the same work dir while the first one's trainers live refuses to start; a stale lock is taken
          over. When a trainer fails (or the driver is interrupted) the others are stopped (SIGTERM:
          the trainer ends with a checkpoint; SIGKILL after --stop_grace seconds) and waited for;
2. render <work>/images/<run>/<subject>/<slug>/<k>.png  via `python -m dreambooth_singlora.eval render`
          (in this process without --gpus; with --gpus through `accelerate launch`, subjects split over
          the GPUs), subjects mixed in batches of --render_batch_size, each run rendered with its own
          seed; --compile for torch.compile; images already there are kept;
3. score  <work>/eval/<run>/  DINO, CLIP-I, CLIP-T and the patch-token DINO diagnostic (docs/EVAL.md),
          real-image features shared;
4. report <work>/table3.md + table3.json (each row's mean over seeds and subjects beside the paper's,
          the paired per-subject difference against LoRA r8 with a bootstrap 95% interval, the settings
          the numbers came from) + <work>/report/ (report.md/csv/json/png/html, every run).

Each stage checks what is already done before it starts anything, so a rerun with nothing left to do
starts no process and loads no model: a (run, subject) is trained when its adapter_config.json has
step == --max_train_steps; rendered when its index.json lists the subject's first --max_prompts prompts
and every <slug>/<k>.png for k < --num_images_per_prompt is there; a run is scored when
<work>/eval/<run>/scores.json covers those subjects and images with the same encoders (and patch-token
diagnostic) and is newer than every index.json of the run (rendering again makes it stale). Delete a
folder to redo its stage. experiments/lr_sweep.py runs the same stages over (method, learning rate).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Optional

from dreambooth_singlora.errors import UserError, cli_entry

from .lock import FolderLock

# The module that trains one subject or many (`python -m <it> --subject S` / `--subjects ...`).
MULTI_SUBJECT_TRAINER = "dreambooth_singlora.train_dreambooth"
#: seconds a trainer gets to end by itself (SIGTERM: it saves a checkpoint) before SIGKILL, when another failed
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class Row:
    """One row of the table: a method and rank, and the trainer settings that make it (None: the trainer's
    default, no flag passed). `paper` holds the paper's (DINO, CLIP-I, CLIP-T) where it has the row."""

    name: str
    method: str
    rank: int
    learning_rate: Optional[float] = None
    ramp_steps: Optional[int] = None
    init: Optional[str] = None
    target_modules: Optional[tuple] = None
    paper: Optional[tuple] = None

    def __post_init__(self):
        from dreambooth_singlora.config import INITS, METHODS, TARGETS

        what = f"row {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(self.name)) or re.search(r"_seed\d+$", self.name):
            raise UserError(f"row name {self.name!r} must be a folder name of letters, digits and _ . + - (and not "
                            "end in _seed<k>, the name of a further seed's run)")
        if self.method not in METHODS:
            raise UserError(f"{what}: unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"{what}: rank must be an integer >= 1, got {self.rank!r}")
        if self.learning_rate is not None and not (isinstance(self.learning_rate, (int, float))
                                                   and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"{what}: learning_rate must be a number > 0, got {self.learning_rate!r}")
        if self.ramp_steps is not None and (not isinstance(self.ramp_steps, int) or self.ramp_steps < 0):
            raise UserError(f"{what}: ramp_steps must be an integer >= 0 (0 = no ramp), got {self.ramp_steps!r}")
        if self.init is not None and self.init not in INITS:
            raise UserError(f"{what}: unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules or any(t not in TARGETS for t in self.target_modules):
                raise UserError(f"{what}: bad target_modules {list(self.target_modules)}; choose from "
                                f"{', '.join(TARGETS)}")

    def train_args(self) -> tuple:
        """The trainer flags of this row's settings (none for a field left to the trainer's default)."""
        out = []
        if self.learning_rate is not None:
            out += ["--learning_rate", repr(float(self.learning_rate))]
        if self.ramp_steps is not None:
            out += ["--ramp_steps", str(self.ramp_steps)]
        if self.init is not None:
            out += ["--init", self.init]
        if self.target_modules is not None:
            out += ["--target_modules", *self.target_modules]
        return tuple(out)

    def describe(self) -> str:
        """'singlora r8, ramp_steps 0': what the row trains, beside the trainer's defaults."""
        extra = [f"{f.name} {' '.join(v) if isinstance(v, tuple) else v}" for f in fields(self)
                 if f.name not in ("name", "method", "rank", "paper") and (v := getattr(self, f.name)) is not None]
        return ", ".join([f"{self.method} r{self.rank}", *extra])


#: the paper's five rows (the default), then named optional rows (ablations of SingLoRA r8)
PAPER_ROWS = (
    Row("lora_r8", "lora", 8, paper=(0.143, 0.677, 0.319)),
    Row("loraplus_r8", "loraplus", 8, paper=(0.150, 0.688, 0.315)),
    Row("dora_r8", "dora", 8, paper=(0.148, 0.687, 0.317)),
    Row("singlora_r8", "singlora", 8, paper=(0.141, 0.677, 0.318)),
    Row("singlora_r16", "singlora", 16, paper=(0.151, 0.690, 0.317)),
)
OPTIONAL_ROWS = (
    Row("singlora_r8_noramp", "singlora", 8, ramp_steps=0),
    Row("singlora_r8_rankinit", "singlora", 8, init="rank"),
    Row("singlora_r8_qkvo", "singlora", 8, target_modules=("to_q", "to_k", "to_v", "to_out.0")),
)
ROWS = {r.name: r for r in PAPER_ROWS + OPTIONAL_ROWS}  # every row --rows can name
DEFAULT_ROWS = tuple(r.name for r in PAPER_ROWS)
PAPER = {r.name: r.paper for r in PAPER_ROWS}  # SingLoRA paper, Table 3: DINO, CLIP-I, CLIP-T
BASELINE = "lora_r8"  # the row every other row is compared with, subject by subject
METRICS = ("dino", "dino_patch", "clip_i", "clip_t")
LABELS = {"dino": "DINO (CLS)", "dino_patch": "DINO patch (diag.)", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
# The standard protocol's settings; a run that differs in any is flagged as not comparable with papers.
PROTOCOL = dict(family="sd1", max_train_steps=400, resolution=512, num_inference_steps=50,  # on SD 1.5
                guidance_scale=7.5, num_images_per_prompt=4, prompts_per_subject=25, subjects=30)
INSTANCE_PROMPT = "a photo of {identifier} {cls}"  # what the trainer uses for a DreamBooth subject
DINO_SCALE_NOTE = ("The paper's DINO values (about 0.15) are not on the scale of the standard protocol "
                   "(about 0.67: DreamBooth on SD, 0.668, with CLS DINO as here); DINO patch (diag.) is the "
                   "position-sensitive patch-token cosine, shown beside it as one candidate for the paper's "
                   "scale, not as the protocol (docs/PROTOCOL.md).")
ROW_FIELDS = ("name", "method", "rank", "learning_rate", "ramp_steps", "init", "target_modules")


def read_rows_file(path) -> list[Row]:
    """Rows from a JSON list of objects or a CSV with a header row, fields ROW_FIELDS (name, method and rank
    required; an empty or absent field is the trainer's default; CSV target_modules space-separated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read the rows file {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"rows file {path} is not valid JSON ({e})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise UserError(f"rows file {path} must hold a JSON list of objects, one per row, e.g. "
                            '[{"name": "singlora_r8_lr3e-4", "method": "singlora", "rank": 8, "learning_rate": 3e-4}]')
    elif path.suffix.lower() == ".csv":
        items = [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(text.splitlines())]
        for r in items:
            for key, cast in (("rank", int), ("learning_rate", float), ("ramp_steps", int)):
                if key in r:
                    try:
                        r[key] = cast(r[key])
                    except ValueError:
                        raise UserError(f"rows file {path}: {key} of row {r.get('name')!r} is not a number: "
                                        f"{r[key]!r}") from None
            if "target_modules" in r:
                r["target_modules"] = r["target_modules"].split()
    else:
        raise UserError(f"rows file {path} must be .json or .csv")
    rows = []
    for i, item in enumerate(items):
        unknown = sorted(set(item) - set(ROW_FIELDS))
        missing = [k for k in ("name", "method", "rank") if k not in item]
        if unknown or missing:
            raise UserError(f"rows file {path}, row {i + 1}: " + (f"unknown field {unknown[0]!r}" if unknown else
                            f"no {missing[0]!r}") + f"; fields: {', '.join(ROW_FIELDS)}")
        rows.append(Row(**item))
    if not rows:
        raise UserError(f"rows file {path} holds no row")
    return rows


def select_rows(names=None, rows_file=None) -> list[Row]:
    """The rows of a run: the named built-in rows and the rows of the file (default: the paper's five)."""
    rows = [ROWS[n] for n in (names or ())] + (read_rows_file(rows_file) if rows_file else [])
    if not rows:
        rows = list(PAPER_ROWS)
    seen = {}
    for r in rows:
        if r.name in seen and seen[r.name] != r:
            raise UserError(f"row {r.name!r} is given twice with different settings")
        seen[r.name] = r
    return list(seen.values())


class Run(NamedTuple):
    """One training run: an adapter per subject in <work>/adapters/<name>/<subject>/, its images in
    <work>/images/<name>/, its scores in <work>/eval/<name>/. `group` is the row (or sweep cell) the run
    belongs to; `train_args` are trainer flags of this run only (e.g. --learning_rate)."""

    name: str
    method: str
    rank: int
    seed: int
    group: str
    train_args: tuple = ()


def seed_runs(rows, n_seeds: int, first_seed: int = 0) -> list[Run]:
    """Every (row, seed) of `rows` (Row objects, or names of ROWS): the first seed's run is named after its row
    (a one-seed work dir's layout), the others <row>_seed<k>."""
    if n_seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {n_seeds}")
    rows = [ROWS[r] if isinstance(r, str) else r for r in rows]
    return [Run(row.name if k == 0 else f"{row.name}_seed{first_seed + k}", row.method, row.rank, first_seed + k,
                row.name, row.train_args()) for row in rows for k in range(n_seeds)]


def trained(folder: Path, steps: int) -> bool:
    cfg = folder / "adapter_config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("step") == steps


def instance_prompt(args, subject: str) -> list[str]:
    """--instance_prompt for one subject's trainer, if --instance_prompt_template asks for another wording."""
    template = getattr(args, "instance_prompt_template", None)
    if not template:
        return []
    from dreambooth_singlora.prompts import IDENTIFIER, get_subject

    return ["--instance_prompt", template.format(identifier=IDENTIFIER, cls=get_subject(subject).class_name)]


def train_command(args, run: Run, subjects: list[str], one_subject: bool = False) -> list[str]:
    """The trainer process of a run: `--subject S` into <adapters>/<run>/<S> (one_subject) or `--subjects ...`
    into <adapters>/<run>/ (one adapter per subject; a method that does not bank gets --subjects_per_batch 1).
    The run's own flags (its row's settings) come before --train_args, which win where both set a flag."""
    from dreambooth_singlora.bank import BANKED

    out = args.work_dir / "adapters" / run.name
    if one_subject:
        who = ["--subject", subjects[0], *instance_prompt(args, subjects[0])]
        out = out / subjects[0]
    else:
        who = ["--subjects", *subjects] + ([] if run.method in BANKED else ["--subjects_per_batch", "1"])
    return [sys.executable, "-m", MULTI_SUBJECT_TRAINER, *who,
            "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--dataset_dir",
            str(args.dataset_dir), "--output_dir", str(out), "--method", run.method, "--rank", str(run.rank),
            "--max_train_steps", str(args.max_train_steps), "--resolution", str(args.resolution),
            "--seed", str(run.seed), "--mixed_precision", args.mixed_precision,
            "--resume_from_checkpoint", "latest", *run.train_args, *args.train_args]


def multi_subject_train_command(args, run: Run, subjects: list[str]) -> list[str]:
    """The one trainer process that trains `subjects` of `run` together (--multi_subject, lr_sweep.py)."""
    return train_command(args, run, subjects)


def stop_processes(procs, grace: float | None = None) -> None:
    """Stop every process of `procs` still running: SIGTERM (a trainer ends at its next step with a checkpoint),
    then SIGKILL for those still there after `grace` seconds (default STOP_GRACE_S); waits for all of them."""
    grace = STOP_GRACE_S if grace is None else grace
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_trainer(cmd: list[str], env: dict) -> None:
    """Run one trainer process to its end (its pid recorded in the locks this process holds); a failure is one
    line (finished subjects are kept); an interrupt of the driver stops the trainer before it returns."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        FolderLock.add_pid(proc.pid)
        proc.wait()
    finally:
        stop_processes([proc])
    if proc.returncode != 0:
        raise SystemExit(f"[train] failed (exit {proc.returncode}): {' '.join(cmd[:6])} ...; fix it and rerun: "
                         "finished subjects are kept")


def train_with_subjects(args, run: Run, subjects) -> None:
    """Train the subjects of `run` not yet trained in one trainer process (`--subjects`)."""
    todo = [s for s in subjects if not trained(args.work_dir / "adapters" / run.name / s, args.max_train_steps)]
    if not todo:
        print(f"[train] {run.name}: all {len(subjects)} subjects already trained", flush=True)
        return
    print(f"[train] {run.name}: {len(todo)} subjects in one trainer run", flush=True)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(args.gpus[0])} if args.gpus else {}))
    with FolderLock(args.work_dir / "adapters" / run.name):
        run_trainer(multi_subject_train_command(args, run, todo), env)


def train_multi_runs(args, runs, subjects) -> list[Run]:
    """--multi_subject: each SingLoRA / LoRA / LoRA+ run's subjects trained together in one process
    (docs/MULTI.md); returns the runs it handled. The adapters are those the per-subject runs would give."""
    from dreambooth_singlora.bank import BANKED

    done = [r for r in runs if r.method in BANKED]
    for run in done:
        train_with_subjects(args, run, subjects)
    return done


def train_all(args, runs, subjects, events=None) -> None:
    """Stage 1: one trainer process per (run, subject), at most one per GPU at a time. A failed trainer (or an
    interrupt) stops the others (stop_processes) and waits for them before the driver exits."""
    if args.multi_subject:
        handled = train_multi_runs(args, runs, subjects)
        runs = [r for r in runs if r not in handled]
        if events is not None and handled:
            events.emit("progress", done=len(handled), total=len(handled), unit="run", stage="train")
    jobs = [(r, s) for r in runs for s in subjects
            if not trained(args.work_dir / "adapters" / r.name / s, args.max_train_steps)]
    if runs:
        print(f"[train] {len(jobs)} of {len(runs) * len(subjects)} adapters to train", flush=True)
    if not jobs:
        return
    slots = [str(g) for g in args.gpus] if args.gpus else [None]
    running: dict = {}  # slot -> (process, run name, subject, log path, open log file)
    total, done = len(jobs), 0
    grace = getattr(args, "stop_grace", None)
    with ExitStack() as locks:
        for run in dict.fromkeys(r for r, _ in jobs):  # every run folder this stage trains into, held till its end
            locks.enter_context(FolderLock(args.work_dir / "adapters" / run.name))
        try:
            while jobs or running:
                for slot in slots:
                    entry = running.get(slot)
                    if entry and entry[0].poll() is not None:
                        proc, name, subject, log, handle = running.pop(slot)
                        handle.close()
                        if proc.returncode != 0:
                            raise SystemExit(f"[train] {name} / {subject} failed (exit {proc.returncode}); "
                                             f"log: {log}. Fix it and rerun: finished subjects are kept")
                        done += 1
                        print(f"[train] done {name} / {subject}", flush=True)
                        if events is not None:
                            events.emit("progress", done=done, total=total, unit="adapter", stage="train")
                    if slot not in running and jobs:
                        run, subject = jobs.pop(0)
                        out = args.work_dir / "adapters" / run.name / subject
                        out.mkdir(parents=True, exist_ok=True)
                        cmd = train_command(args, run, [subject], one_subject=True)
                        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
                        log = out / "train.log"
                        handle = log.open("w")
                        try:
                            proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
                        except BaseException:
                            handle.close()
                            raise
                        FolderLock.add_pid(proc.pid)
                        running[slot] = (proc, run.name, subject, log, handle)
                time.sleep(0.2)
        finally:
            if running:  # a trainer failed, or the driver was interrupted: the others stop before it exits
                names = ", ".join(f"{e[1]} / {e[2]}" for e in running.values())
                print(f"[train] stopping the trainers still running ({names}): each ends with a checkpoint",
                      flush=True)
                stop_processes([e[0] for e in running.values()], grace)
                for e in running.values():
                    e[4].close()


def expected_prompts(subject: str, max_prompts) -> list[str]:
    """The prompts `render` gives a subject: its first max_prompts evaluation prompts (all 25 if None)."""
    from dreambooth_singlora.prompts import get_subject

    return get_subject(subject).eval_prompts()[:max_prompts]


def rendered(folder: Path, prompts: list[str], n_images: int) -> bool:
    """True when <folder> (one subject's images) holds every image of these prompts: index.json (written
    once a subject is complete) names a folder for each prompt and each holds 0.png .. <n_images-1>.png."""
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        slugs = {rec["prompt"]: rec["slug"] for rec in index["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p in slugs and all((folder / slugs[p] / f"{k}.png").is_file() for k in range(n_images))
               for p in prompts)


def render_todo(images_dir: Path, subjects, max_prompts, n_images: int) -> list[str]:
    """The subjects of one run whose images are not all there yet."""
    return [s for s in subjects
            if not rendered(Path(images_dir) / s, expected_prompts(s, max_prompts), n_images)]


def render_argv(args, run: Run, todo: list[str]) -> list[str]:
    """`eval render`'s arguments for the subjects of one run still missing images (seed = the run's seed)."""
    argv = ["render", "--adapters", str(args.work_dir / "adapters" / run.name),
            "--output", str(args.work_dir / "images" / run.name), "--subjects", *todo,
            "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
            "--num_images_per_prompt", str(args.num_images_per_prompt), "--seed", str(run.seed),
            "--batch_size", str(args.render_batch_size)] + (["--compile"] if args.compile else [])
    return argv + (["--max_prompts", str(args.max_prompts)] if args.max_prompts else [])


def render_all(args, runs, subjects, events=None) -> None:
    """Stage 2: `python -m dreambooth_singlora.eval render` per run, only for runs with images missing and
    only their subjects missing some: in this process without --gpus (no process to start, the base model
    loaded once per run), else through `accelerate launch` over the GPUs."""
    for i, run in enumerate(runs):
        _progress(events, i, len(runs), "render")
        todo = render_todo(args.work_dir / "images" / run.name, subjects, args.max_prompts,
                           args.num_images_per_prompt)
        if not todo:
            print(f"[render] {run.name}: all {len(subjects)} subjects already rendered", flush=True)
            continue
        print(f"[render] {run.name}: {len(todo)} of {len(subjects)} subjects", flush=True)
        if not args.gpus:
            from dreambooth_singlora.eval.cli import main as eval_main

            if eval_main(render_argv(args, run, todo)):
                raise SystemExit(f"[render] {run.name} failed")
            continue
        rc = subprocess.run(render_command(args, run, todo)).returncode
        if rc != 0:
            raise SystemExit(f"[render] {run.name} failed (exit {rc}); fix it and rerun: rendered subjects are "
                             "kept and the rerun renders the rest")
    _progress(events, len(runs), len(runs), "render")


def render_command(args, run: Run, todo: list[str]) -> list[str]:
    """`accelerate launch` of `eval render` for the subjects `todo` of `run`, one process per GPU (at most one
    per subject)."""
    n = max(1, min(len(args.gpus), len(todo)))
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--gpu_ids", ",".join(map(str, args.gpus[:n])),
            "-m", "dreambooth_singlora.eval", *render_argv(args, run, todo)]


def _progress(events, done: int, total: int, stage: str) -> None:
    if events is not None:
        events.emit("progress", done=done, total=total, unit="run", stage=stage)


def want_patch_tokens(args) -> bool:
    return bool(getattr(args, "dino_patch_tokens", False)) and "dino" in args.encoders


def current_scores(args, name, subjects) -> dict | None:
    """<work>/eval/<name>/scores.json if it is the score of what is in <work>/images/<name> now (same subjects,
    same number of images, same encoders and patch-token diagnostic, written after every index.json of the
    run), else None."""
    from dreambooth_singlora.eval.report import load_results

    path = args.work_dir / "eval" / name / "scores.json"
    images = args.work_dir / "images" / name
    indexes = [images / s / "index.json" for s in subjects]
    if not path.is_file() or not all(i.is_file() for i in indexes):
        return None
    try:
        result = load_results(path)
    except UserError:
        return None
    n = sum(len(expected_prompts(s, args.max_prompts)) for s in subjects) * args.num_images_per_prompt
    same = (set(result.get("subjects") or ()) == set(subjects) and result.get("scored", {}).get("images") == n
            and set(result.get("settings", {}).get("encoders") or ()) == set(args.encoders)
            and ("dino_patch" in result.get("metrics", ())) == want_patch_tokens(args))
    newer = path.stat().st_mtime_ns >= max(i.stat().st_mtime_ns for i in indexes)
    return result if same and newer else None


def score_all(args, runs, subjects, events=None) -> dict:
    """Stage 3: score every run with the same encoders and one cache of real-image features; a run whose
    scores.json is current (current_scores) is read back, and no encoder is loaded if none is left."""
    from dreambooth_singlora.eval import ReferenceCache, load_encoders, score_folder, write_score_outputs

    results, encoders, cache = {}, None, None
    for i, run in enumerate(runs):
        _progress(events, i, len(runs), "score")
        kept = current_scores(args, run.name, subjects)
        if kept is not None:
            print(f"[score] {run.name}: scores.json is current, kept", flush=True)
            results[run.name] = kept
            continue
        if encoders is None:
            encoders = load_encoders(args.encoders, checkpoints={"clip": args.clip_checkpoint,
                                                                 "dino": args.dino_checkpoint},
                                     dino_patch_tokens=want_patch_tokens(args))
            cache = ReferenceCache(args.dataset_dir)
        print(f"[score] {run.name}", flush=True)
        results[run.name] = score_folder(args.work_dir / "images" / run.name, args.dataset_dir, encoders,
                                         subjects=subjects, cache=cache, max_prompts=args.max_prompts)
        write_score_outputs(results[run.name], args.work_dir / "eval" / run.name, name=run.name)
    _progress(events, len(runs), len(runs), "score")
    return results


# ---------------------------------------------------------------------------------------------
# Statistics and the table

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def subject_means(results: dict, runs, group: str, metric: str) -> dict:
    """{subject: mean over the group's seeds of that seed's subject mean} (subjects every seed scored)."""
    mine = [r for r in runs if r.group == group and r.name in results]
    if not mine:
        return {}
    common = set.intersection(*(set(results[r.name]["subjects"]) for r in mine))
    out = {}
    for s in sorted(common):
        vals = [results[r.name]["subjects"][s].get(metric) for r in mine]
        if all(v is not None for v in vals):
            out[s] = math.fsum(vals) / len(vals)
    return out


def group_stats(results: dict, runs, baseline: str | None = BASELINE, metrics=METRICS, *,
                n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Per group (row) and metric: the mean over subjects of the per-subject seed means, their std across
    subjects, the std across seeds of the seed runs' overall means, and the paired per-subject difference
    against `baseline` (mean over seeds of the row minus mean over seeds of the baseline, per subject) with
    a bootstrap 95% interval over subjects (eval.metrics.paired_bootstrap)."""
    from dreambooth_singlora.eval.metrics import mean_std, paired_bootstrap

    groups = list(dict.fromkeys(r.group for r in runs if r.name in results))
    out = {}
    for g in groups:
        seeds = [r for r in runs if r.group == g and r.name in results]
        out[g] = dict(runs=[r.name for r in seeds], seeds=[r.seed for r in seeds], metrics={})
        for m in metrics:
            per = subject_means(results, runs, g, m)
            if not per:
                continue
            mean, std = mean_std(list(per.values()))
            seed_means = [((results[r.name]["summary"]["all"].get(m)) or {}).get("mean") for r in seeds]
            seed_sd = mean_std(seed_means)[1] if all(v is not None for v in seed_means) else None
            entry = dict(mean=mean, std_subjects=std, std_seeds=seed_sd, n_subjects=len(per),
                         n_seeds=len(seeds), subjects=per, difference=None)
            base = subject_means(results, runs, baseline, m) if baseline and g != baseline else {}
            paired = [s for s in per if s in base]
            if paired:
                entry["difference"] = dict(against=baseline, **paired_bootstrap(
                    [per[s] for s in paired], [base[s] for s in paired], n_resamples=n_resamples, seed=seed))
            out[g]["metrics"][m] = entry
    return out


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(e: dict | None) -> str:
    if not e:
        return "-"
    return _f(e["mean"]) + (f" ± {_f(e['std_subjects'])}" if e.get("std_subjects") is not None else "")


def _diff(e: dict | None) -> str:
    d = (e or {}).get("difference")
    if not d:
        return "-"
    ci = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
    return f"{d['mean']:+.3f}{ci}"


def provenance(args, runs, subjects) -> dict:
    """What the numbers came from, recorded in table3.md/json and report.md/json."""
    n_prompts = len(expected_prompts(subjects[0], args.max_prompts)) if subjects else 0
    prov = {
        "base model": args.pretrained_model_name_or_path,
        "base family": args.family or "unknown",
        "dataset": str(args.dataset_dir),
        "subjects": f"{len(subjects)}: {' '.join(subjects)}",
        "training": f"{args.max_train_steps} optimizer steps at batch 1, {args.resolution} px, "
                    f"mixed precision {args.mixed_precision}, instance prompt "
                    f"{getattr(args, 'instance_prompt_template', None) or INSTANCE_PROMPT!r}"
                    + (f", extra trainer flags {' '.join(args.train_args)}" if args.train_args else ""),
        "seeds": ", ".join(str(s) for s in sorted({r.seed for r in runs})),
        "runs": ", ".join(r.name for r in runs),
        **({"rows": "; ".join(f"{r.name} = {r.describe()}" for r in args.row_specs)}
           if getattr(args, "row_specs", None) else {}),
        "rendering": f"{n_prompts} prompts per subject x {args.num_images_per_prompt} images, "
                     f"{args.num_inference_steps} inference steps, guidance {args.guidance_scale}, "
                     f"seed = the run's seed, batch {args.render_batch_size}, compile {bool(args.compile)}",
        "encoders": ", ".join(args.encoders) + (" (+ DINO patch-token diagnostic)" if want_patch_tokens(args) else ""),
        "CLIP checkpoint": args.clip_checkpoint or "default: open_clip ('ViT-B-32', 'openai'), downloaded",
        "DINO checkpoint": args.dino_checkpoint or "default: timm vit_small_patch16_224.dino, downloaded",
    }
    have = dict(family=args.family or "unknown", max_train_steps=args.max_train_steps, resolution=args.resolution,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                num_images_per_prompt=args.num_images_per_prompt, prompts_per_subject=n_prompts,
                subjects=len(subjects))
    off = [f"{k} {have[k]} (protocol: {v})" for k, v in PROTOCOL.items() if have[k] != v]
    if args.clip_checkpoint or args.dino_checkpoint:
        off.append("local encoder checkpoints (check they are OpenAI CLIP ViT-B/32 and DINO ViT-S/16)")
    prov["differs from the protocol"] = "; ".join(off) if off else "nothing"
    return prov


def provenance_lines(prov: dict) -> list[str]:
    lines = []
    if prov.get("differs from the protocol", "nothing") != "nothing":
        lines += [f"**Not a protocol run: {prov['differs from the protocol']}. These numbers are not comparable "
                  "with the paper's.**", ""]
    return lines + [f"- {k}: {v}" for k, v in prov.items()]


def table3(results: dict, runs=None, prov: dict | None = None, stats: dict | None = None, rows=None) -> str:
    """table3.md: means over seeds and subjects beside the paper, then the paired differences against LoRA.
    rows: the Row of each group (default: the built-in rows of those names), for the paper's numbers and
    what each row trains."""
    runs = runs if runs is not None else seed_runs([n for n in results if n in ROWS], 1)
    rows = {r.name: r for r in (rows if rows is not None else [ROWS[g] for g in dict.fromkeys(r.group for r in runs)
                                                                if g in ROWS])}
    stats = stats if stats is not None else group_stats(results, runs)
    metrics = [m for m in METRICS if any(m in s["metrics"] for s in stats.values())]
    out = ["# Table 3: DreamBooth on SD1.5", ""]
    if prov:
        out += provenance_lines(prov)[:2] if prov.get("differs from the protocol", "nothing") != "nothing" else []
    header = ["row", "seeds"] + [f"{LABELS[m]} (ours)" for m in metrics] + ["DINO (paper)", "CLIP-I (paper)",
                                                                          "CLIP-T (paper)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g, s in stats.items():
        p = (rows[g].paper if g in rows else None) or (None, None, None)
        lines.append(f"| {g} | {len(s['seeds'])} | " + " | ".join(_cell(s["metrics"].get(m)) for m in metrics)
                     + f" | {_f(p[0])} | {_f(p[1])} | {_f(p[2])} |")
    out += lines + ["", "ours: mean over subjects of each subject's mean over seeds ± the std across those subject "
                        "means; paper: SingLoRA Table 3 (- where the paper has no such row).", "", DINO_SCALE_NOTE, ""]
    if rows:
        out += ["What each row trains (a setting not named is the trainer's default): "
                + "; ".join(f"{g} = {rows[g].describe()}" for g in stats if g in rows) + ".", ""]
    seed_cols = [m for m in metrics if any((s["metrics"].get(m) or {}).get("std_seeds") is not None
                                           for s in stats.values())]
    if seed_cols:
        out += ["Seed-to-seed std of each row's overall mean (how much one run moves): " + "; ".join(
            f"{g} " + ", ".join(f"{LABELS[m]} {_f((s['metrics'].get(m) or {}).get('std_seeds'))}" for m in seed_cols)
            for g, s in stats.items()), ""]
    diffs = {g: s for g, s in stats.items() if any((e or {}).get("difference") for e in s["metrics"].values())}
    out += ["## Paired difference against LoRA r8", ""]
    if diffs:
        first = next(e["difference"] for s in diffs.values() for e in s["metrics"].values() if e.get("difference"))
        h = ["row", "subjects"] + [f"Δ {LABELS[m]} [95% CI]" for m in metrics]
        out += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        for g, s in diffs.items():
            n = max(((e.get("difference") or {}).get("n") or 0) for e in s["metrics"].values())
            out.append(f"| {g} | {n} | " + " | ".join(_diff(s["metrics"].get(m)) for m in metrics) + " |")
        out += ["", f"Δ: per subject, the row's mean over seeds minus {BASELINE}'s mean over seeds, averaged over "
                    f"subjects; interval: percentile bootstrap over subjects resampled with replacement "
                    f"({first['n_resamples']} resamples, RNG seed {first['seed']}; none with fewer than 2 subjects). "
                    "An interval that contains 0 does not separate the row from LoRA r8; seed noise enters "
                    "through each subject's mean over seeds.", ""]
    else:
        out += [f"No row to compare: {BASELINE} is not among the rows (or shares no subject with them).", ""]
    out += ["## Choices this tool makes", "",
            "- Instance prompt: the paper writes \"a photo of a sks <class>\"; this tool trains with "
            "\"a photo of sks <class>\" (the DreamBooth paper's wording). `--instance_prompt_template "
            "\"a photo of a {identifier} {cls}\"` trains the other reading, one trainer process per subject "
            "(not with --multi_subject: the trainer takes no per-subject prompt with --subjects).",
            "- Steps: the paper says 400 \"iterations\" and also \"epochs\"; this tool trains 400 optimizer steps "
            "at batch 1 (--max_train_steps). 400 epochs would be 400 x 4-6 photos = 1,600-2,400 steps, "
            "different per subject; subjects trained together step together, so there is no per-subject "
            "epoch flag (--max_train_steps sets one count for all).", ""]
    if prov:
        out += ["## Where these numbers came from", ""] + provenance_lines(prov) + [""]
    return "\n".join(out)


def write_tables(args, runs, subjects, results: dict, rows=None) -> dict:
    """table3.md, table3.json and <work>/report/ from the scores of every run."""
    from dreambooth_singlora.eval import write_report
    from dreambooth_singlora.fileio import write_json_atomic, write_text_atomic

    prov = provenance(args, runs, subjects)
    stats = group_stats(results, runs, n_resamples=args.bootstrap_resamples)
    write_report(results, args.work_dir / "report", reference=True, provenance=prov)
    write_json_atomic(args.work_dir / "table3.json", dict(
        format="dreambooth-singlora-table3/1", provenance=prov, baseline=BASELINE, paper=PAPER, rows=stats,
        row_settings={r.name: {f: getattr(r, f) for f in ROW_FIELDS} for r in rows or ()}))
    write_text_atomic(args.work_dir / "table3.md", table3(results, runs, prov, stats, rows))
    return stats


# ---------------------------------------------------------------------------------------------
# Command line

def add_common_arguments(p: argparse.ArgumentParser, work_dir: str) -> None:
    """The flags reproduce_table3.py and lr_sweep.py share (model, data, stages, training, render, score)."""
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--dataset_dir", type=Path, required=True)
    p.add_argument("--work_dir", type=Path, default=Path(work_dir))
    p.add_argument("--subjects", nargs="+", default=None, help="default: all 30")
    p.add_argument("--stages", nargs="+", default=["train", "render", "score"], choices=["train", "render", "score"])
    p.add_argument("--gpus", nargs="*", type=int, default=[],
                   help="GPU ids to use (default: accelerate's device, rendering in this process)")
    p.add_argument("--mixed_precision", default="bf16", choices=("no", "fp16", "bf16"),
                   help="training precision (frozen models; adapters stay fp32)")
    p.add_argument("--max_train_steps", type=int, default=400, help="optimizer steps at batch 1 (the paper's "
                   "400 'iterations')")
    p.add_argument("--resolution", type=int, default=None,
                   help="training resolution (default: the base's own: 512 for SD 1.5, 1024 for SDXL)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (training and rendering)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts per subject (demos)")
    p.add_argument("--render_batch_size", type=int, default=16,
                   help="images per rendering batch (an H100 takes 48: UNet batch 96, 17 GB); lower it if out of "
                        "memory")
    p.add_argument("--compile", action="store_true",
                   help="render with torch.compile'd UNet and VAE decoder (GPU; 3,000 images in ~14 min instead of "
                        "~21 on an H100, docs/BENCHMARKS.md)")
    p.add_argument("--encoders", nargs="+", default=["clip", "dino"])
    p.add_argument("--clip_checkpoint", default=None)
    p.add_argument("--dino_checkpoint", default=None)
    p.add_argument("--dino_patch_tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="score the patch-token DINO diagnostic beside the CLS DINO (default: on)")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="extra trainer flags (last)")


def resolve_base(args) -> None:
    """The base's family (args.family, recorded beside the protocol's) and, unless given, its own resolution
    (args.resolution): read from its configs before anything trains or renders. A run that only scores needs no
    base: both come from the first trained adapter's config (None where there is none)."""
    from dreambooth_singlora.adapter import adapter_family
    from dreambooth_singlora.base import default_resolution, detect_family

    if {"train", "render"} & set(args.stages):
        args.family = detect_family(args.pretrained_model_name_or_path).name
        if args.resolution is None:
            args.resolution = default_resolution(args.pretrained_model_name_or_path)
        return
    configs = sorted((Path(args.work_dir) / "adapters").glob("**/adapter_config.json"))
    meta = json.loads(configs[0].read_text()) if configs else {}
    args.family = adapter_family(meta) if meta else None
    if args.resolution is None:
        args.resolution = meta.get("run", {}).get("resolution")


def resolve_subjects(args) -> list[str]:
    from dreambooth_singlora.prompts import get_subject
    from dreambooth_singlora.prompts import subjects as all_subjects

    if not args.subjects or args.subjects == ["all"]:
        return list(all_subjects())
    return [get_subject(s).name for s in args.subjects]  # an unknown name: one line


def add_table3_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `eval table3` (and scripts/reproduce_table3.py)."""
    add_common_arguments(p, "table3")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), metavar="ROW",
                   help=f"built-in rows to run (default: the paper's five, {' '.join(DEFAULT_ROWS)}); optional rows: "
                        f"{', '.join(f'{r.name} ({r.describe()})' for r in OPTIONAL_ROWS)}")
    p.add_argument("--rows_file", default=None,
                   help="rows of your own: a .json list of objects or a .csv with a header, fields "
                        f"{', '.join(ROW_FIELDS)} (name, method, rank required; others default to the trainer's); "
                        "with --rows, both sets run")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every (row, subject) this many times, seeds --seed .. --seed + N - 1 (default 1)")
    p.add_argument("--bootstrap_resamples", type=int, default=10_000,
                   help="resamples of the subjects for the 95%% interval of each difference against LoRA r8")
    p.add_argument("--multi_subject", action="store_true",
                   help="train each SingLoRA, LoRA and LoRA+ run's subjects together in one batched run "
                        "(same adapters, faster; DoRA stays one subject at a time)")
    p.add_argument("--instance_prompt_template", default=None,
                   help="instance prompt per subject, e.g. 'a photo of a {identifier} {cls}' (the paper's wording); "
                        "default: the trainer's 'a photo of {identifier} {cls}'; one trainer process per subject, "
                        "so not with --multi_subject")
    p.add_argument("--stop_grace", type=float, default=STOP_GRACE_S,
                   help="when a trainer fails, seconds the others get to stop with a checkpoint (SIGTERM) before "
                        "they are killed (default %(default)s)")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="append the job's events to FILE as JSON lines (started, progress per stage, finished/failed)")


def build_parser(prog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table3_arguments(p)
    return p


def run_table3(args) -> int:
    """The four stages as the parsed flags say (see the module docstring)."""
    from dreambooth_singlora.events import job

    if args.instance_prompt_template and args.multi_subject:
        raise UserError("--instance_prompt_template needs one trainer process per subject: drop --multi_subject "
                        "(the trainer takes no per-subject prompt with --subjects)")
    if args.bootstrap_resamples < 1:
        raise UserError(f"--bootstrap_resamples must be >= 1, got {args.bootstrap_resamples}")
    if args.stop_grace < 0:
        raise UserError(f"--stop_grace must be >= 0 seconds, got {args.stop_grace}")
    args.row_specs = select_rows(args.rows, args.rows_file)
    resolve_base(args)
    subjects = resolve_subjects(args)
    runs = seed_runs(args.row_specs, args.seeds, args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with job("table3", args.events) as events:
        events.emit("started", config=dict(work_dir=args.work_dir, rows=[r.name for r in args.row_specs],
                                           seeds=args.seeds, subjects=subjects, stages=args.stages))
        if "train" in args.stages:
            train_all(args, runs, subjects, events)
        if "render" in args.stages:
            render_all(args, runs, subjects, events)
        if "score" in args.stages:
            results = score_all(args, runs, subjects, events)
            write_tables(args, runs, subjects, results, args.row_specs)
            print((args.work_dir / "table3.md").read_text())
    return 0


@cli_entry
def main(argv=None):
    return run_table3(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
