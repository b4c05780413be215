"""Does the stable learning rate depend on the layer width? A learning-rate x width sweep on the section-5 task.

The task is experiments/synthetic_section5.py's (fixed X, frozen random W_q, W_k, target softmax(N(0, 1))
logits, Frobenius loss, full-batch AdamW); the target is n x n and does not change with d, and the
base logits are O(1) at every width. For each width d and learning rate, four adapters, each
initialised as the project initialises it:

    lora             dW = B A, rank r, B = 0, A ~ uniform(+-1/sqrt(d))           2 r d params / projection
    loraplus         the same, B's learning rate x --loraplus_ratio (16, the project's default)
    singlora_width   dW = u(t) A A^T, rank 2r, init_A_('width') (the project's default)   2 r d
    singlora_rank    the same with init_A_('rank') (fan-in r, the public SingLoRA code's)  2 r d

Per width: the best learning rate (lowest median final loss), the band of learning rates whose
median final loss is within --band x the best (reported as max_lr / min_lr over those grid points),
and the share of runs that diverge (final loss non-finite or above the starting loss).

    python experiments/synthetic_lr_width.py                         # defaults: docs/SYNTHETIC.md
    python experiments/synthetic_lr_width.py --widths 16 32 --seeds 2 --steps 30 --lrs 1e-3 1e-2 1e-1
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_common import (ROOT, Method, check_lrs, check_positive, diverged, grid_and_legend,  # noqa: E402
                              machine, parse_config, pyplot, quartiles, r4, run_and_print, save_figure,
                              save_results, seed_range, train, with_threads)
from dreambooth_singlora.errors import UserError, cli_entry  # noqa: E402

METHODS = ("lora", "loraplus", "singlora_width", "singlora_rank")


@dataclass
class Config:
    """The learning-rate x width sweep. Every field is a CLI flag."""

    widths: tuple = field(default=(64, 128, 256, 512, 1024), metadata={"help": "widths d"})
    lrs: tuple = field(default=tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-9, 0)),
                       metadata={"help": "AdamW learning rates (default: half-decade grid 3.16e-5 .. 0.316)"})
    seeds: int = field(default=12, metadata={"help": "seeds per (method, width, lr)"})
    seed_offset: int = field(default=0, metadata={"help": "first seed"})
    steps: int = field(default=300, metadata={"help": "full-batch AdamW steps per run"})
    tokens: int = field(default=32, metadata={"help": "rows n of X; the target is n x n at every width"})
    rank: int = field(default=4, metadata={"help": "LoRA / LoRA+ rank r; SingLoRA gets 2r (equal parameters)"})
    methods: tuple = field(default=METHODS, metadata={"help": f"subset of {', '.join(METHODS)}"})
    loraplus_ratio: float = field(default=16.0, metadata={"help": "LoRA+: B's lr = lr x this (the project's default)"})
    ramp_steps: int = field(default=-1, metadata={"help": "SingLoRA ramp T: -1 = 10%% of --steps, 0 = no ramp"})
    band: float = field(default=2.0, metadata={"help": "the lr band: grid points whose median final loss is <= "
                                                       "band x the best median"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    output: str = field(default=os.path.join(ROOT, "results", "synthetic", "synthetic_lr_width.json"),
                        metadata={"help": "results JSON ('' = none)"})
    plot: str = field(default=os.path.join(ROOT, "assets", "synthetic_lr_width.png"),
                      metadata={"help": "figure ('' = none)"})

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.lrs = tuple(sorted(float(x) for x in self.lrs))
        self.methods = tuple(self.methods)
        check_positive(self, ("seeds", "steps", "tokens", "rank", "threads"))
        check_lrs(self.lrs)
        if not self.widths or any(2 * self.rank > w for w in self.widths):
            raise UserError(f"--widths {list(self.widths)}: every width must be >= SingLoRA's rank 2r = {2 * self.rank}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(f"unknown --methods {bad}; valid: {', '.join(METHODS)}")
        if self.seed_offset < 0:
            raise UserError(f"--seed_offset must be >= 0, got {self.seed_offset}")
        if not self.band >= 1 or self.loraplus_ratio <= 0:
            raise UserError(f"--band must be >= 1 and --loraplus_ratio > 0, got {self.band}, {self.loraplus_ratio}")
        if self.ramp_steps < 0:
            self.ramp_steps = self.steps // 10


def make_method(name: str, cfg: Config) -> Method:
    """The adapter `name` as the project initialises it (LoRA / LoRA+ rank r, SingLoRA rank 2r)."""
    r, T = cfg.rank, cfg.ramp_steps
    return {"lora": Method("lora", "lora", r),
            "loraplus": Method("loraplus", "lora", r, b_lr_ratio=cfg.loraplus_ratio),
            "singlora_width": Method("singlora_width", "singlora", 2 * r, init="width", ramp_steps=T),
            "singlora_rank": Method("singlora_rank", "singlora", 2 * r, init="rank", ramp_steps=T)}[name]


def lr_summary(lrs: list[float], loss: torch.Tensor, band: float) -> dict:
    """loss (L, S, points) at one width -> best lr, lr band, divergence shares, per-lr quartiles."""
    q = quartiles(loss[..., -1], dim=1)  # (3, L); a diverged seed counts as +inf
    div = diverged(loss)  # (L, S)
    med = q[1]
    best_i = int(torch.argmin(med))  # the first (smallest) lr on ties
    best = float(med[best_i])
    inside = [i for i in range(len(lrs)) if math.isfinite(best) and float(med[i]) <= band * best]
    return {"best_lr": lrs[best_i], "best_median": r4(best),
            "band_lrs": [lrs[i] for i in inside],
            "band_factor": r4(lrs[max(inside)] / lrs[min(inside)]) if inside else None,
            "diverged_share": r4(div.float().mean()),
            "nonfinite_share": r4((~torch.isfinite(loss[..., -1])).float().mean()),
            "initial_median": r4(loss[..., 0].median()),
            "by_lr": {repr(lr): {"median": r4(q[1, i]), "q25": r4(q[0, i]), "q75": r4(q[2, i]),
                                 "diverged": int(div[i].sum()),
                                 "nonfinite": int((~torch.isfinite(loss[i, :, -1])).sum())} for i, lr in enumerate(lrs)}}


def slope(widths: list[int], best_lrs: list[float]) -> float:
    """Least-squares exponent a in best_lr ~ d^a (0: width-independent)."""
    x = torch.tensor([math.log(w) for w in widths], dtype=torch.float64)
    y = torch.tensor([math.log(v) for v in best_lrs], dtype=torch.float64)
    if len(widths) < 2:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


@with_threads
def run(cfg: Config) -> dict:
    """The whole sweep; results dict (what --output holds); writes the JSON and the plot."""
    from tqdm import tqdm

    t0 = time.time()
    seeds = seed_range(cfg)
    lrs = list(cfg.lrs)
    res = {"config": dataclasses.asdict(cfg) | {"widths": list(cfg.widths), "lrs": lrs, "methods": list(cfg.methods)},
           "machine": machine(), "methods": {}}
    bar = tqdm(total=len(cfg.methods) * len(cfg.widths) * cfg.steps, desc="lr x width", mininterval=5, disable=None)
    for name in cfg.methods:
        m = make_method(name, cfg)
        per_width = {}
        for d in cfg.widths:
            out = train(m, lrs, seeds, cfg.tokens, d, cfg.steps, max(cfg.steps // 10, 1), cfg.weight_decay, bar)
            assert sum(out["params"].values()) == 2 * m.params_per_projection(d), out["params"]
            per_width[str(d)] = {**lr_summary(lrs, out["loss"], cfg.band), "params_per_seed": out["params"]}
        best = [per_width[str(d)]["best_lr"] for d in cfg.widths]
        res["methods"][name] = {"kind": m.kind, "rank": m.rank, "init": m.init if m.kind == "singlora" else None,
                                "b_lr_ratio": m.b_lr_ratio, "ramp_steps": m.ramp_steps,
                                "best_lr_exponent": r4(slope(list(cfg.widths), best)), "widths": per_width}
    bar.close()
    return save_results(res, cfg, t0, lambda path: make_plot(res, path))


def markdown_table(res: dict) -> str:
    """One row per (method, width): best lr, band, divergence."""
    cfg = res["config"]
    lines = [f"{cfg['seeds']} seeds, {cfg['steps']} steps; best lr = lowest median final loss; band = grid lrs "
             f"with median <= {cfg['band']:g}x the best (max/min); diverged = final loss non-finite or above the "
             "start, share of all lr x seed runs", "",
             "| method | d | best lr | best median loss | band (lrs) | band factor | diverged |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for name, m in res["methods"].items():
        for d, w in m["widths"].items():
            band = f"{min(w['band_lrs']):g} .. {max(w['band_lrs']):g}" if w["band_lrs"] else "-"
            lines.append(f"| {name} | {d} | {w['best_lr']:g} | {w['best_median']} | {band} | "
                         f"{w['band_factor']:g} | {w['diverged_share']:.1%} |")
    lines += ["", "Exponent a of best lr ~ d^a (least squares over the widths; 0 = width-independent): "
              + "; ".join(f"{n} {m['best_lr_exponent']:+.2f}" for n, m in res["methods"].items()), ""]
    return "\n".join(lines)


def make_plot(res: dict, path: str) -> None:
    """Best learning rate against width (log-log), bars spanning each width's lr band."""
    plt = pyplot()
    cfg = res["config"]
    colors = {"lora": "tab:blue", "loraplus": "tab:green", "singlora_width": "tab:red", "singlora_rank": "tab:purple"}
    shift = {"lora": 0.94, "loraplus": 0.98, "singlora_width": 1.02, "singlora_rank": 1.06}  # spread the markers
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, m in res["methods"].items():
        ws = [int(d) for d in m["widths"]]
        best = [m["widths"][str(d)]["best_lr"] for d in ws]
        lo = [b - min(m["widths"][str(d)]["band_lrs"]) for b, d in zip(best, ws)]
        hi = [max(m["widths"][str(d)]["band_lrs"]) - b for b, d in zip(best, ws)]
        ax.errorbar([w * shift[name] for w in ws], best, yerr=[lo, hi], color=colors[name], marker="o", capsize=3,
                    label=f"{name} (slope {m['best_lr_exponent']:+.2f})")
    ax.set(xscale="log", yscale="log", xlabel="width d", ylabel="best AdamW learning rate",
           title=f"best lr vs width; bars: lrs within {cfg['band']:g}x of the best loss\n"
                 f"{cfg['seeds']} seeds, {cfg['steps']} steps, LoRA r={cfg['rank']}, SingLoRA r={2 * cfg['rank']}")
    grid_and_legend([ax], fontsize=8)
    save_figure(fig, path)


@cli_entry
def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    print(f"lr x width: widths {list(cfg.widths)}, lrs {list(cfg.lrs)}, {cfg.seeds} seeds, {cfg.steps} steps, "
          f"methods {list(cfg.methods)}, ramp T={cfg.ramp_steps}", flush=True)
    return run_and_print(run, cfg, markdown_table)


if __name__ == "__main__":
    main()
