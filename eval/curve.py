"""`eval curve`: subject fidelity over training steps, from the checkpoints a run saved.

    dreambooth-singlora eval curve --run runs/dog --dataset_dir dreambooth/dataset --output curves/dog
    dreambooth-singlora eval curve --run runs/three --output curves/three --max_prompts 3 --steps 100 200 400

<run> is a trainer --output_dir; its checkpoints (<run>/checkpoints/checkpoint-<step>/) are what the curve
reads, so train with `--checkpointing_steps N --checkpoints_total_limit 0` (0 keeps every checkpoint; the
default limit of 2 prunes all but the last two). Steps past 400 work like any other (`--max_train_steps 1200`).
A run of one subject (`--subject dog`) keeps the adapter itself in each checkpoint; a batched run (`--subjects
dog cat ...`, one group) keeps every subject's tensors stacked in bank.safetensors, and each subject's
adapter at that step is written out of it (dreambooth_singlora.checkpoint.subject_adapter) into
<output>/adapters/step-<N>/<subject>/. (A --subjects run split into several groups removes each group's
checkpoints once its adapters are written: curve a run of one group.)

For every step: the first --max_prompts (default 3) of each subject's 25 prompts x --num_images_per_prompt
images are rendered with the same seeds at every step (generate_many: subjects mixed in a batch) into
<output>/images/step-<N>/, scored (CLIP-I, CLIP-T, DINO; the score JSON of the step goes to
<output>/steps/step-<N>.json, written atomically when the step is done). Then the whole curve is written:
    curve.csv    step, subject (or "mean"), metric, mean, low, high, n_images: the 95% percentile bootstrap
                 interval over the images (for "mean": images resampled within each subject, then the mean
                 of the subject means)
    curve.png    one panel per metric, the metric against the step: a line per subject and their mean
                 (black), the interval shaded
    curve.html   the plot, the table and, per subject and prompt, the images of each step side by side
    curve.json   every number and the settings they came from
Resumable: a step whose steps/step-<N>.json was written with the same settings (and, while its checkpoint
is there, the same weights) is kept, neither rendered nor scored again; an interrupted step renders only
its missing images. Held-out photos (trainer --holdout) add <metric>_train / _heldout / _gap (eval.holdout).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
from pathlib import Path

from dreambooth_singlora.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "dreambooth-singlora-curve/1"
PLOTTED = ("clip_i", "clip_t", "dino")  # the protocol's three, one panel each (others: CSV and JSON only)
DEFAULT_PROMPTS = 3
MEAN = "mean"  # the subject column of the rows over all subjects


def add_curve_command(subparsers) -> None:
    from dreambooth_singlora.config import GenerateConfig, add_arguments

    from .cli import add_encoder_arguments, add_events_argument

    p = subparsers.add_parser("curve", help="CLIP-I, CLIP-T and DINO at every saved checkpoint of a run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the trainer's --output_dir (holding checkpoints/checkpoint-<step>/)")
    p.add_argument("--output", required=True, help="folder for the curve (csv, png, html, json) and its images")
    p.add_argument("--dataset_dir", default=None,
                   help="the DreamBooth dataset (<subject>/NN.jpg); default: the one the run recorded")
    p.add_argument("--subjects", nargs="+", default=None, help="subjects to curve (default: every subject of the run)")
    p.add_argument("--steps", nargs="+", type=int, default=None, help="only these steps (default: every checkpoint)")
    p.add_argument("--max_prompts", type=int, default=DEFAULT_PROMPTS,
                   help="the first N of each subject's 25 prompts (default %(default)s)")
    p.add_argument("--render_batch_size", type=int, default=4, help="images per rendering batch")
    add_arguments(p, GenerateConfig, exclude=("adapter", "prompt", "prompts_file", "subject", "output_dir",
                                              "skip_existing", "merge", "batch_size", "overwrite", "adapter_scale",
                                              "events"))
    add_encoder_arguments(p)
    p.add_argument("--with_identifier", action="store_true",
                   help="CLIP-T with the prompt as generated; default: identifier removed")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_events_argument(p)
    p.set_defaults(func=run_curve)


# ---------------------------------------------------------------------------------------------
# checkpoints

def checkpoints_by_step(run) -> dict:
    """{step: (checkpoint folder, its trainer_state)} of a run's complete checkpoints."""
    from dreambooth_singlora.checkpoint import checkpoint_root, list_checkpoints, read_state

    out = {}
    for path in list_checkpoints(checkpoint_root(run)):
        state = read_state(path)
        out[int(state["step"])] = (path, state)
    return out


def weights_digest(checkpoint: Path):
    """sha256 (16 hex digits) of a checkpoint's adapter weights (bank or single adapter), None if gone."""
    from dreambooth_singlora.checkpoint import BANK_NAME
    from dreambooth_singlora.config import WEIGHTS_NAME

    for name in (BANK_NAME, WEIGHTS_NAME):
        f = Path(checkpoint) / name
        if f.is_file():
            return hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return None


def run_holdouts(run: Path, state: dict, subjects) -> dict:
    """{subject: held-out photo names}: from the run's final adapter folders if written, else its checkpoint's
    run records."""
    from .holdout import holdout_files, read_config

    out = {}
    for s in subjects:
        meta = read_config(run / s) or read_config(run)
        if meta is not None and (meta.get("run") or {}).get("subject", s) == s:
            out[s] = holdout_files(meta)
        else:
            out[s] = holdout_files({"run": (state.get("runs") or {}).get(s) or {}})
    return out


# ---------------------------------------------------------------------------------------------
# the command

def run_curve(args) -> int:
    from dreambooth_singlora.events import job
    from dreambooth_singlora.prompts import get_subject

    run, out = Path(args.run), Path(args.output)
    if args.max_prompts < 1:
        raise UserError(f"--max_prompts must be >= 1, got {args.max_prompts}")
    found = checkpoints_by_step(run)
    if not found:
        raise UserError(f"no checkpoint in {run / 'checkpoints'}: train with --checkpointing_steps N "
                        "--checkpoints_total_limit 0 (0 keeps every checkpoint) to curve a run")
    steps = sorted(found) if args.steps is None else sorted(set(args.steps))
    missing = [s for s in steps if s not in found]
    if missing:
        raise UserError(f"no checkpoint of step {missing[0]} in {run / 'checkpoints'} (steps there: "
                        f"{' '.join(map(str, sorted(found)))}); pruned ones are gone: train with "
                        "--checkpoints_total_limit 0")
    last = found[steps[-1]][1]
    names = last["subjects"] or [run.name]
    subjects = [get_subject(s).name for s in (args.subjects or names)]
    for step in steps:
        held = found[step][1]["subjects"] or [run.name]
        lacking = [s for s in subjects if s not in held]
        if lacking:
            raise UserError(f"checkpoint-{step} does not hold {lacking[0]} (it holds {', '.join(held)})")
    config = last.get("config") or {}
    dataset = args.dataset_dir or config.get("dataset_dir")
    if not dataset:
        raise UserError("the run records no dataset: give --dataset_dir (the DreamBooth dataset)")
    base = args.pretrained_model_name_or_path or config.get("pretrained_model_name_or_path")
    cfg = generate_config(args, base)
    prompts = {s: get_subject(s).eval_prompts(cfg.identifier)[:args.max_prompts] for s in subjects}
    holdout = run_holdouts(run, last, subjects)
    generation = {k: v for k, v in cfg.settings().items() if k not in ("adapter", "pretrained_model_name_or_path")}
    key = dict(subjects=subjects, prompts=prompts, generation=generation,
               base_model=base, encoders=sorted(args.encoders), clip_checkpoint=args.clip_checkpoint,
               dino_checkpoint=args.dino_checkpoint, dino_patch_tokens=args.dino_patch_tokens,
               with_identifier=args.with_identifier, dataset_dir=str(Path(dataset).resolve()), holdout=holdout)
    key = json.loads(json.dumps(key, default=str))  # as it reads back from a step's JSON
    with job("curve", args.events) as events:
        events.emit("started", config=dict(run=run, output=out, steps=steps, **key))
        state = _Lazy(args, base, cfg, dataset)
        results = {}
        for i, step in enumerate(steps):
            events.emit("progress", done=i, total=len(steps), unit="checkpoint", step=step)
            results[step] = step_result(state, out, step, found[step][0], subjects, prompts, key, holdout, events)
        events.emit("progress", done=len(steps), total=len(steps), unit="checkpoint")
        paths = write_curve(results, out, subjects, key, run)
    table = curve_rows(results, subjects)
    for m in [m for m in PLOTTED if any(r[2] == m for r in table)]:
        cells = [f"{r[0]}: {r[3]:.4f}" for r in table if r[1] == MEAN and r[2] == m]
        print(f"{m:<7} " + "  ".join(cells))
    print(f"rendered {state.rendered} of {len(steps)} steps (the others kept); wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def generate_config(args, base):
    from dreambooth_singlora.config import GenerateConfig, from_args

    ns = argparse.Namespace(**vars(args))
    ns.adapter, ns.merge, ns.pretrained_model_name_or_path = None, False, base
    ns.batch_size, ns.output_dir, ns.skip_existing = args.render_batch_size, str(args.output), True
    if not base:
        raise UserError("the run records no base model: give --pretrained_model_name_or_path")
    return from_args(GenerateConfig, ns)


class _Lazy:
    """The pipeline, the encoders and the real-image cache, loaded the first time a step needs them (a curve
    whose steps are all kept loads nothing)."""

    def __init__(self, args, base, cfg, dataset):
        self.args, self.base, self.cfg, self.dataset = args, base, cfg, dataset
        self._pipe = self._encoders = self._cache = None
        self.rendered = 0

    def pipe(self):
        if self._pipe is None:
            from dreambooth_singlora.generate import load_pipeline

            self._pipe = load_pipeline(None, self.base, device=self.args.device, dtype=self.cfg.dtype,
                                       scheduler=self.cfg.scheduler)
        return self._pipe

    def scorer(self):
        if self._encoders is None:
            from .cli import encoders_from_args
            from .score import ReferenceCache

            self._encoders, self._cache = encoders_from_args(self.args), ReferenceCache(self.dataset)
        return self._encoders, self._cache


def step_result(state: _Lazy, out: Path, step: int, checkpoint: Path, subjects, prompts, key, holdout,
                events=None) -> dict:
    """The score result of one step: kept from <out>/steps/step-<N>.json when it was made with `key` (and the
    checkpoint's weights, while the checkpoint is there), else rendered, scored and written."""
    from dreambooth_singlora.checkpoint import subject_adapter
    from dreambooth_singlora.fileio import write_json_atomic
    from dreambooth_singlora.generate import generate_many

    from .render import events_kwarg
    from .score import score_folder

    path = out / "steps" / f"step-{step}.json"
    digest = weights_digest(checkpoint)
    kept = _read_json(path)
    if kept and kept.get("curve_key") == key and (digest is None or kept.get("weights") == digest):
        logger.info("step %d: kept %s", step, path)
        return kept
    adapters = {s: subject_adapter(checkpoint, s, out / "adapters" / f"step-{step}" / s) for s in subjects}
    images = out / "images" / f"step-{step}"
    generate_many(state.pipe(), adapters, state.cfg, images, prompts, **events_kwarg(generate_many, events))
    state.rendered += 1
    encoders, cache = state.scorer()
    result = score_folder(images, state.dataset, encoders, with_identifier=state.args.with_identifier,
                          identifier=state.cfg.identifier, subjects=subjects, cache=cache,
                          progress=not state.args.no_progress, holdout=holdout,
                          max_prompts=state.args.max_prompts)
    result.update(curve_key=key, weights=digest, step=step, checkpoint=str(checkpoint))
    write_json_atomic(path, result)
    return result


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# the table, the plot, the page

def curve_metrics(results: dict) -> list:
    first = next(iter(results.values()))
    held = (first.get("holdout") or {}).get("metrics", [])
    return list(first["metrics"]) + [m for m in held if m not in first["metrics"]]


def curve_rows(results: dict, subjects) -> list:
    """[step, subject or "mean", metric, mean, low, high, n_images] for every step, subject and metric."""
    from .metrics import stratified_bootstrap

    rows = []
    for step in sorted(results):
        r = results[step]
        for m in curve_metrics(results):
            per = {s: [rec[m] for rec in r["images"] if rec["subject"] == s and rec.get(m) is not None]
                   for s in subjects}
            per = {s: v for s, v in per.items() if v}
            for s, values in per.items():
                b = stratified_bootstrap([values])
                rows.append([step, s, m, b["mean"], b["low"], b["high"], b["n"]])
            if len(per) > 1:
                b = stratified_bootstrap(list(per.values()))
                rows.append([step, MEAN, m, b["mean"], b["low"], b["high"], b["n"]])
            elif per:  # one subject: its row is the mean
                rows.append([step, MEAN, *rows[-1][2:]])
    return rows


def plot_curve(rows: list, subjects, path, title: str) -> None:
    """One panel per plotted metric: metric against step, a line per subject and the mean (black), intervals
    shaded. matplotlib's object API: the caller's backend is left alone."""
    from matplotlib.figure import Figure

    from dreambooth_singlora.fileio import atomic_path

    from .report import label

    metrics = [m for m in PLOTTED if any(r[2] == m for r in rows)]
    fig = Figure(figsize=(4.2 * max(1, len(metrics)), 3.8))
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    lines = [s for s in subjects] + ([MEAN] if len(subjects) > 1 else [])
    for ax, m in zip(axes, metrics):
        for s in lines:
            pts = sorted((r[0], r[3], r[4], r[5]) for r in rows if r[1] == s and r[2] == m)
            if not pts:
                continue
            x = [p[0] for p in pts]
            mean = s == MEAN or len(subjects) == 1
            color = "black" if mean else None
            line, = ax.plot(x, [p[1] for p in pts], marker="o", markersize=3, linewidth=2.2 if mean else 1.0,
                            color=color, label="mean of subjects" if s == MEAN else s, alpha=1.0 if mean else 0.8)
            if all(p[2] is not None for p in pts):
                ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(),
                                alpha=0.18 if mean else 0.08, linewidth=0)
        ax.set_title(label(m), fontsize=10)
        steps = sorted({r[0] for r in rows})
        if len(steps) <= 12:
            ax.set_xticks(steps)
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[0].set_ylabel("cosine (mean over images)")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _fmt_row(r) -> list:
    f = (lambda x: "-" if x is None else f"{x:.4f}")
    return [r[0], r[1], r[2], f(r[3]), f"[{f(r[4])}, {f(r[5])}]", r[6]]


def curve_page(results: dict, rows: list, subjects, out: Path, key: dict, run: Path, chart: str) -> str:
    """curve.html: the plot, the mean rows, and each subject's images of every step side by side."""
    from .report import _CSS, _img, label

    out = out.resolve()
    steps = sorted(results)
    parts = ["<!doctype html><meta charset='utf-8'><title>Fidelity over training steps</title>",
             f"<style>{_CSS}</style>", "<h1>Fidelity over training steps</h1>",
             f"<p>Run <code>{html.escape(str(run))}</code>; steps {', '.join(map(str, steps))}; "
             f"{len(next(iter(key['prompts'].values())))} prompts x {key['generation']['num_images_per_prompt']} "
             f"images per subject and step, the same seeds at every step. Interval: 95% percentile bootstrap over "
             f"the images (curve.csv has every row).</p>",
             f'<p><img src="{html.escape(chart)}" alt="metrics against the training step" style="max-width:100%"></p>']
    header = ["step", "subject", "metric", "mean", "95% interval", "images"]
    mean_rows = [_fmt_row(r) for r in rows if r[1] == MEAN]
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td class=num>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in mean_rows)
        + "</table>")
    first = results[steps[-1]]
    dataset = Path(first["dataset_dir"])
    for s in subjects:
        held = set(((first.get("holdout") or {}).get("files") or {}).get(s, []))
        reals = "".join(_img(dataset / p, out, p, 64) if Path(p).name not in held else
                        f'<span style="outline:3px dashed #c44">{_img(dataset / p, out, p + " (held out)", 64)}</span>'
                        for p in first["real_images"].get(s, []))
        note = " (dashed: held out of training)" if held else ""
        parts.append(f'<h2 id="{html.escape(s)}">{html.escape(s)}</h2><div class=real>Real photos{note}: {reals}</div>')
        parts.append("<table><tr><th>Prompt</th>" + "".join(f"<th>step {t}</th>" for t in steps) + "</tr>")
        for p in key["prompts"][s]:
            cells = []
            for t in steps:
                r = results[t]
                recs = [rec for rec in r["images"] if rec["subject"] == s and rec["prompt"] == p]
                imgs = "".join(_img(Path(r["images_dir"]) / rec["path"], out, ", ".join(
                    f"{label(m)} {rec[m]:.3f}" for m in r["metrics"])) for rec in recs)
                pv = r["prompts"].get(s, {}).get(p)
                nums = (", ".join(f"{label(m)} {pv[m]:.3f}" for m in r["metrics"] if m in PLOTTED) if pv
                        else "not scored")
                cells.append(f"<td>{imgs}<br><span class=num>{html.escape(nums)}</span></td>")
            parts.append(f"<tr><td>{html.escape(p)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def write_curve(results: dict, out: Path, subjects, key: dict, run: Path) -> dict:
    """curve.csv, curve.png, curve.html and curve.json in `out` (each atomically)."""
    from dreambooth_singlora.fileio import write_json_atomic, write_text_atomic

    from .report import _csv_text

    rows = curve_rows(results, subjects)
    paths = {"csv": out / "curve.csv", "png": out / "curve.png", "html": out / "curve.html", "json": out / "curve.json"}
    write_text_atomic(paths["csv"], _csv_text(["step", "subject", "metric", "mean", "low", "high", "n_images"], rows))
    plot_curve(rows, subjects, paths["png"], f"{run.name}: fidelity over training steps "
                                              f"(shaded: 95% bootstrap interval over images)")
    write_text_atomic(paths["html"], curve_page(results, rows, subjects, out, key, run, paths["png"].name))
    write_json_atomic(paths["json"], dict(
        format=FORMAT, run=str(run), steps=sorted(results), subjects=subjects, settings=key,
        interval="95% percentile bootstrap over images (2000 resamples, seed 0); mean rows: images resampled "
                 "within each subject, then the mean of the subject means",
        rows=[dict(zip(("step", "subject", "metric", "mean", "low", "high", "n_images"), r)) for r in rows],
        checkpoints={str(t): results[t].get("checkpoint") for t in sorted(results)}))
    return paths
