"""Section 5 of SingLoRA (arXiv 2507.05566) as the paper describes it: learn a random attention pattern.

Per seed: a fixed input X (n x d, N(0, 1)), frozen random W_q, W_k (d x d, N(0, 1/d)) and a target
attention pattern T = softmax(N(0, 1) logits) (n x n). Adapters on W_q and W_k are trained with
full-batch AdamW on the loss ||softmax(Q K^T / sqrt(d)) - T||_F, Q = X (W_q + dW_q)^T.

    LoRA r        dW = B A, B = 0, A ~ uniform(+-1/sqrt(d)) (PEFT)          2 r d parameters per projection
    SingLoRA 2r   dW = u(t) A A^T, A: d x 2r, the project's init_A_('width')  2 r d   (equal parameters)
    SingLoRA r    dW = u(t) A A^T, A: d x r                                   r d     (equal rank)

All use scale alpha / r = 1. One fixed learning rate (--lr, run on --seeds seeds, the Figure-1 style
curves) and a learning-rate sweep (--lrs, on the first --sweep_seeds of them).

    python experiments/synthetic_section5.py                      # defaults: docs/SYNTHETIC.md
    python experiments/synthetic_section5.py --seeds 8 --sweep_seeds 4 --steps 40 --lrs 1e-3 1e-2 --dim 16
"""

from __future__ import annotations

import dataclasses
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


@dataclass
class Config:
    """The section-5 experiment. Every field is a CLI flag."""

    seeds: int = field(default=1000, metadata={"help": "seeds at the fixed --lr (the paper: 1K); each seed draws "
                                                       "its own X, W_q, W_k, target and adapter init"})
    sweep_seeds: int = field(default=128, metadata={"help": "seeds (the first ones of --seeds) at each --lrs point"})
    seed_offset: int = field(default=0, metadata={"help": "first seed"})
    steps: int = field(default=2000, metadata={"help": "full-batch AdamW steps per run"})
    dim: int = field(default=64, metadata={"help": "width d (W_q, W_k are d x d, one head)"})
    tokens: int = field(default=32, metadata={"help": "rows n of X (tokens); the target is n x n"})
    rank: int = field(default=4, metadata={"help": "LoRA rank r; SingLoRA runs at 2r (equal parameters) and r "
                                                   "(equal rank)"})
    lr: float = field(default=1e-3, metadata={"help": "the fixed AdamW learning rate (loss curves, --seeds seeds)"})
    lrs: tuple = field(default=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                       metadata={"help": "learning-rate sweep (--sweep_seeds seeds each)"})
    ramp_steps: int = field(default=-1, metadata={"help": "SingLoRA ramp T, u(t) = min(t/T, 1): -1 = 10%% of "
                                                          "--steps (the project's default fraction), 0 = no ramp"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (torch's default)"})
    eval_every: int = field(default=20, metadata={"help": "steps between recorded loss points"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    output: str = field(default=os.path.join(ROOT, "results", "synthetic", "synthetic_section5.json"),
                        metadata={"help": "results JSON ('' = none)"})
    plot: str = field(default=os.path.join(ROOT, "assets", "synthetic_section5.png"),
                      metadata={"help": "figure ('' = none)"})

    def __post_init__(self):
        self.lrs = tuple(float(x) for x in self.lrs)
        check_positive(self, ("seeds", "sweep_seeds", "steps", "dim", "tokens", "rank", "eval_every", "threads"))
        check_lrs(self.lrs + (self.lr,))
        if self.seed_offset < 0:
            raise UserError(f"--seed_offset must be >= 0, got {self.seed_offset}")
        if self.sweep_seeds > self.seeds:
            raise UserError(f"--sweep_seeds {self.sweep_seeds} must be <= --seeds {self.seeds}")
        if 2 * self.rank > self.dim:
            raise UserError(f"--rank {self.rank}: SingLoRA's rank 2r must be <= --dim {self.dim}")
        if self.ramp_steps < 0:
            self.ramp_steps = self.steps // 10


def methods(cfg: Config) -> list[Method]:
    """LoRA r, SingLoRA 2r (equal parameters), SingLoRA r (equal rank)."""
    r, T = cfg.rank, cfg.ramp_steps
    return [Method(f"lora_r{r}", "lora", r),
            Method(f"singlora_r{2 * r}", "singlora", 2 * r, ramp_steps=T),
            Method(f"singlora_r{r}", "singlora", r, ramp_steps=T)]


def curve_stats(loss: torch.Tensor) -> dict:
    """loss (S, points) -> median and quartile curves over seeds, rounded."""
    q = quartiles(loss, dim=0)  # (3, points)
    return {k: [r4(x) for x in q[i]] for i, k in enumerate(("q25", "median", "q75"))}


def final_stats(loss: torch.Tensor) -> dict:
    """loss (S, points) -> final-loss quartiles and the divergence count."""
    q = quartiles(loss[:, -1])
    return {"median": r4(q[1]), "q25": r4(q[0]), "q75": r4(q[2]), "diverged": int(diverged(loss).sum()),
            "runs": loss.shape[0]}


def paired_wins(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Share of seeds where a < b at each recorded point: (S, points) x2 -> list."""
    return [r4(x) for x in (a < b).float().mean(0)]


@with_threads
def run(cfg: Config) -> dict:
    """The fixed-lr run and the sweep; results dict (what --output holds); writes the JSON and plot."""
    from tqdm import tqdm

    t0 = time.time()
    seeds = seed_range(cfg)
    sweep_lrs = [lr for lr in cfg.lrs if lr != cfg.lr]  # the fixed lr's sweep point reuses its first seeds
    ms = methods(cfg)
    res = {"config": dataclasses.asdict(cfg) | {"lrs": list(cfg.lrs)}, "machine": machine(),
           "paper_seeds": 1000, "methods": {}}
    curves = {}  # method -> {"fixed": (S, points), lr: (S_sweep, points)}
    bar = tqdm(total=len(ms) * cfg.steps * (1 + bool(sweep_lrs)), desc="section 5", mininterval=5,
               disable=None)
    for m in ms:
        fixed = train(m, [cfg.lr], seeds, cfg.tokens, cfg.dim, cfg.steps, cfg.eval_every,
                      cfg.weight_decay, bar)
        res["steps"] = fixed["steps"]
        c = {"fixed": fixed["loss"][0]}  # (S, points)
        if sweep_lrs:
            sw = train(m, sweep_lrs, seeds[:cfg.sweep_seeds], cfg.tokens, cfg.dim, cfg.steps, cfg.eval_every,
                       cfg.weight_decay, bar)
            c.update({lr: sw["loss"][i] for i, lr in enumerate(sweep_lrs)})
        c[cfg.lr] = c["fixed"][:cfg.sweep_seeds]
        curves[m.name] = c
        by_lr = {repr(lr): final_stats(c[lr]) for lr in cfg.lrs if lr in c}
        finite = {lr: v["median"] for lr, v in by_lr.items() if v["median"] is not None}
        best = float(min(finite, key=finite.get)) if finite else cfg.lr
        res["methods"][m.name] = {
            "kind": m.kind, "rank": m.rank, "ramp_steps": m.ramp_steps, "init": m.init if m.kind == "singlora" else None,
            "params_per_seed": fixed["params"],
            "fixed_lr": {**final_stats(c["fixed"]), **curve_stats(c["fixed"])},
            "by_lr": by_lr, "best_lr": best, "best_lr_curve": curve_stats(c[best])}
    bar.close()
    names = [m.name for m in ms]
    lora, eq_par, eq_rank = names
    res["initial_loss"] = {k: r4(v) for k, v in zip(("q25", "median", "q75"), quartiles(curves[lora]["fixed"][:, 0]))}
    res["comparisons"] = {
        f"{other}_below_{lora}": {
            "fixed_lr_share_of_seeds": paired_wins(curves[other]["fixed"], curves[lora]["fixed"]),
            "by_lr_final_share_of_seeds": {repr(lr): r4((curves[other][lr][:, -1] < curves[lora][lr][:, -1])
                                                        .float().mean()) for lr in cfg.lrs},
            "best_vs_best_final_share_of_seeds": r4(
                (curves[other][res["methods"][other]["best_lr"]][:, -1]
                 < curves[lora][res["methods"][lora]["best_lr"]][:, -1]).float().mean())}
        for other in (eq_par, eq_rank)}
    p = {n: sum(res["methods"][n]["params_per_seed"].values()) for n in names}
    assert p[lora] == p[eq_par] == 4 * cfg.rank * cfg.dim and p[eq_rank] == 2 * cfg.rank * cfg.dim, p
    res["params_per_seed"] = p
    return save_results(res, cfg, t0, lambda path: make_plot(res, path))


def fmt(s: dict) -> str:
    if s["median"] is None:
        return "diverged"
    div = f", {s['diverged']}/{s['runs']} div." if s["diverged"] else ""
    return f"{s['median']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]{div}"


def markdown_tables(res: dict) -> str:
    """The fixed-lr checkpoints and the sweep, as Markdown (what the docs show)."""
    cfg, names = res["config"], list(res["methods"])
    lora = names[0]
    steps = res["steps"]
    picks = sorted({i for i, t in enumerate(steps) if t in (cfg["steps"] // 10, cfg["steps"] // 4,
                                                            cfg["steps"] // 2, cfg["steps"])})
    lines = [f"Fixed lr {cfg['lr']:g}, {cfg['seeds']} seeds; loss median [25%, 75%] "
             f"(initial loss {res['initial_loss']['median']:.3f}):", "",
             "| step | " + " | ".join(names) + " | " + " | ".join(f"seeds with {n} lower" for n in names[1:]) + " |",
             "|---:|" + "---:|" * (2 * len(names) - 1)]
    for i in picks:
        cells = []
        for n in names:
            m = res["methods"][n]["fixed_lr"]
            cells.append(f"{m['median'][i]:.3f} [{m['q25'][i]:.3f}, {m['q75'][i]:.3f}]")
        wins = [f"{res['comparisons'][f'{n}_below_{lora}']['fixed_lr_share_of_seeds'][i]:.1%}" for n in names[1:]]
        lines.append(f"| {steps[i]} | " + " | ".join(cells + wins) + " |")
    lines += ["", f"Learning-rate sweep, final loss after {cfg['steps']} steps, {cfg['sweep_seeds']} seeds; "
                  "median [25%, 75%] (bold: each method's best):", "",
              "| lr | " + " | ".join(names) + " | " + " | ".join(f"seeds with {n} lower" for n in names[1:]) + " |",
              "|---:|" + "---:|" * (2 * len(names) - 1)]
    for lr in cfg["lrs"]:
        cells = []
        for n in names:
            b = "**" if lr == res["methods"][n]["best_lr"] else ""
            cells.append(f"{b}{fmt(res['methods'][n]['by_lr'][repr(lr)])}{b}")
        wins = [f"{res['comparisons'][f'{n}_below_{lora}']['by_lr_final_share_of_seeds'][repr(lr)]:.1%}"
                for n in names[1:]]
        lines.append(f"| {lr:g} | " + " | ".join(cells + wins) + " |")
    bb = "; ".join(f"{n} vs {lora}: {res['comparisons'][f'{n}_below_{lora}']['best_vs_best_final_share_of_seeds']:.1%}"
                   for n in names[1:])
    lines += ["", f"Each at its own best lr, share of seeds below LoRA: {bb}.", ""]
    return "\n".join(lines)


def make_plot(res: dict, path: str) -> None:
    """Figure-1 style: loss vs step at the fixed lr and at each best lr (median, IQR band); final loss vs lr."""
    plt = pyplot()
    cfg, steps = res["config"], res["steps"]
    colors = ["tab:blue", "tab:red", "tab:orange"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (name, m), color in zip(res["methods"].items(), colors):
        label = f"{name} ({sum(m['params_per_seed'].values())} params)"
        for ax, c, tag in ((axes[0], m["fixed_lr"], f"lr {cfg['lr']:g}"), (axes[1], m["best_lr_curve"], f"lr {m['best_lr']:g}")):
            med = [float("nan") if x is None else x for x in c["median"]]
            lo = [float("nan") if x is None else x for x in c["q25"]]
            hi = [float("nan") if x is None else x for x in c["q75"]]
            ax.plot(steps, med, color=color, label=f"{label}, {tag}")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2)
        lrs = cfg["lrs"]
        st = [m["by_lr"][repr(lr)] for lr in lrs]
        med = [s["median"] if s["median"] is not None else float("nan") for s in st]
        lo = [s["median"] - s["q25"] if s["median"] is not None else 0 for s in st]
        hi = [s["q75"] - s["median"] if s["median"] is not None else 0 for s in st]
        axes[2].errorbar(lrs, med, yerr=[lo, hi], color=color, marker="o", capsize=3, label=name)
    axes[0].set(title=f"fixed lr {cfg['lr']:g}, {cfg['seeds']} seeds (median, 25-75% band)")
    axes[1].set(title=f"each method's best lr, {cfg['sweep_seeds']} seeds")
    for ax in axes[:2]:
        ax.set(xlabel="AdamW step", ylabel="||softmax(QK^T/sqrt d) - T||_F", yscale="log")
    axes[2].set(xscale="log", yscale="log", xlabel="learning rate", ylabel=f"loss after {cfg['steps']} steps",
                title=f"final loss vs lr (median, bars 25-75%), {cfg['sweep_seeds']} seeds")
    grid_and_legend(axes, fontsize=7)
    fig.suptitle(f"Section-5 task: random target attention, d={cfg['dim']}, n={cfg['tokens']}, "
                 f"SingLoRA ramp T={cfg['ramp_steps']}", fontsize=10)
    save_figure(fig, path)


@cli_entry
def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    print(f"section 5: d={cfg.dim}, n={cfg.tokens}; LoRA r={cfg.rank} vs SingLoRA r={2 * cfg.rank} and r={cfg.rank}; "
          f"lr {cfg.lr:g} on {cfg.seeds} seeds, sweep {list(cfg.lrs)} on {cfg.sweep_seeds}; {cfg.steps} steps; "
          f"ramp T={cfg.ramp_steps}", flush=True)
    return run_and_print(run, cfg, markdown_tables, params_label="Parameters per seed")


if __name__ == "__main__":
    main()
