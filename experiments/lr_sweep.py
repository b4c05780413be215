"""Learning-rate sweep for DreamBooth: train every method at several learning rates, render, score, compare.

    python experiments/lr_sweep.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_dir dreambooth/dataset --work_dir lr_sweep --methods singlora lora \\
        --learning_rates 3e-5 1e-4 3e-4 1e-3 --subjects dog cat backpack --gpus 0

One run per (method, learning rate): the trainer once with `--subjects` (one adapter per subject in
<work>/adapters/<method>_lr<lr>/<subject>/; DoRA, which does not batch subjects, with
--subjects_per_batch 1), then `eval render` into <work>/images/<method>_lr<lr>/ and `eval score` into
<work>/eval/<method>_lr<lr>/, with scripts/reproduce_table3.py's stages (same resumability: a rerun with
nothing left to do starts no process and loads no model). Outputs:
    <work>/sweep.md    per metric, a table method x learning rate: mean of subject means ± std across subjects
    <work>/sweep.json  the same numbers with the settings they came from
    <work>/sweep.png   metric against learning rate (log scale), one line per method
    <work>/report/     the evaluation report of every run (report.md/csv/json/png/html)
The rest of the flags (steps, resolution, render settings, encoders) are reproduce_table3.py's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reproduce_table3 as t3  # noqa: E402  (scripts/reproduce_table3.py: its stages are reused as they are)

from dreambooth_singlora.errors import UserError, cli_entry  # noqa: E402

METHODS = ("singlora", "lora", "loraplus", "dora")
METRICS = ("dino", "clip_i", "clip_t")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_patch": "DINO patch (diag.)"}


def lr_name(lr: float) -> str:
    return f"{lr:.6g}"


def sweep_runs(methods, learning_rates, rank: int, seed: int) -> list[t3.Run]:
    """One run per (method, learning rate), named <method>_lr<lr>, grouped by method."""
    names = [lr_name(lr) for lr in learning_rates]
    if len(set(names)) != len(names):
        raise UserError(f"--learning_rates name the same folder twice: {' '.join(names)}")
    if any(not lr > 0 for lr in learning_rates):
        raise UserError(f"--learning_rates must be > 0, got {' '.join(map(str, learning_rates))}")
    return [t3.Run(f"{m}_lr{n}", m, rank, seed, m, ("--learning_rate", repr(lr)))
            for m in methods for lr, n in zip(learning_rates, names)]


def run_lr(run: t3.Run) -> float:
    return float(run.train_args[run.train_args.index("--learning_rate") + 1])


def sweep_table(results: dict, runs, metrics=METRICS) -> dict:
    """{"cells": [{method, learning_rate, run, <metric>: {mean, std, n_subjects}}], "metrics": [...]}."""
    metrics = [m for m in metrics if any(m in results[r.name]["metrics"] for r in runs if r.name in results)]
    cells = []
    for r in runs:
        if r.name not in results:
            continue
        summary = results[r.name]["summary"]["all"]
        cells.append(dict(method=r.method, learning_rate=run_lr(r), run=r.name, rank=r.rank, seed=r.seed, **{
            m: {k: (summary.get(m) or {}).get(k) for k in ("mean", "std", "n_subjects")} for m in metrics}))
    return dict(metrics=metrics, cells=cells)


def sweep_markdown(table: dict, prov: dict) -> str:
    lrs = sorted({c["learning_rate"] for c in table["cells"]})
    methods = list(dict.fromkeys(c["method"] for c in table["cells"]))
    by = {(c["method"], c["learning_rate"]): c for c in table["cells"]}
    out = ["# Learning-rate sweep", ""]
    out += t3.provenance_lines(prov)[:2] if prov.get("differs from the protocol", "nothing") != "nothing" else []
    for m in table["metrics"]:
        out += [f"## {LABELS.get(m, m)}", "", "| method | " + " | ".join(f"lr {lr_name(lr)}" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
        for meth in methods:
            vals = {lr: (by.get((meth, lr)) or {}).get(m) or {} for lr in lrs}
            best = max((v["mean"] for v in vals.values() if v.get("mean") is not None), default=None)
            cells = []
            for lr in lrs:
                v = vals[lr]
                if v.get("mean") is None:
                    cells.append("-")
                    continue
                text = f"{v['mean']:.3f}" + (f" ± {v['std']:.3f}" if v.get("std") is not None else "")
                cells.append(f"**{text}**" if v["mean"] == best and len(lrs) > 1 else text)
            out.append(f"| {meth} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Each cell: mean of the subject means ± their std across subjects; bold: the method's highest mean. "
            "One seed per cell: differences smaller than the seed-to-seed spread (reproduce_table3.py --seeds) "
            "are noise.", "", "## Where these numbers came from", ""] + t3.provenance_lines(prov) + [""]
    return "\n".join(out)


def sweep_plot(table: dict, path) -> None:
    """Metric against learning rate (log x), one line per method, std across subjects as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreambooth_singlora.fileio import atomic_path

    metrics = table["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    methods = list(dict.fromkeys(c["method"] for c in table["cells"]))
    for ax, m in zip(axes[0], metrics):
        for meth in methods:
            pts = sorted((c["learning_rate"], c[m]) for c in table["cells"]
                         if c["method"] == meth and c[m].get("mean") is not None)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                            yerr=[p[1]["std"] or 0.0 for p in pts], marker="o", capsize=3, label=meth)
        ax.set_xscale("log")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("learning rate")
        ax.set_title(LABELS.get(m, m), fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("cosine (mean of subject means)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Learning-rate sweep (error bars: std across subjects)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_sweep(args, runs, subjects, results: dict) -> dict:
    from dreambooth_singlora.eval import write_report
    from dreambooth_singlora.fileio import write_json_atomic, write_text_atomic

    prov = t3.provenance(args, runs, subjects)
    prov["learning rates"] = " ".join(lr_name(lr) for lr in args.learning_rates)
    prov["methods"] = f"{' '.join(args.methods)}, rank {args.rank}"
    table = sweep_table(results, runs)
    write_report(results, args.work_dir / "report", provenance=prov)
    write_json_atomic(args.work_dir / "sweep.json", dict(format="dreambooth-singlora-lr-sweep/1",
                                                         provenance=prov, **table))
    write_text_atomic(args.work_dir / "sweep.md", sweep_markdown(table, prov))
    sweep_plot(table, args.work_dir / "sweep.png")
    return table


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t3.add_common_arguments(p, "lr_sweep")
    p.add_argument("--methods", nargs="+", default=["singlora", "lora"], choices=METHODS)
    p.add_argument("--learning_rates", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4, 1e-3])
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)
    if args.rank < 1 or any(math.isnan(lr) for lr in args.learning_rates):
        raise UserError("--rank must be >= 1 and --learning_rates numbers")
    t3.resolve_base(args)
    subjects = t3.resolve_subjects(args)
    runs = sweep_runs(args.methods, args.learning_rates, args.rank, args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if "train" in args.stages:
        for run in runs:
            t3.train_with_subjects(args, run, subjects)
    if "render" in args.stages:
        t3.render_all(args, runs, subjects)
    if "score" in args.stages:
        results = t3.score_all(args, runs, subjects)
        write_sweep(args, runs, subjects, results)
        print((args.work_dir / "sweep.md").read_text())


if __name__ == "__main__":
    main()
