"""Perturbed-layer experiment (the project's own, not the paper's section 5): LoRA vs SingLoRA.

The paper's section-5 set-up (a random target attention pattern) is experiments/synthetic_section5.py.
Here the target is the attention map of the same layer with a perturbed W_q and W_k. A frozen single-head attention layer, logits = (X W_q^T)(X W_k^T)^T / sqrt(d), is given adapters on
its query and key projections, trained with AdamW to reproduce the attention maps of a hidden
target layer (W_q + dQ, W_k + dK; dQ, dK of rank k). Loss: KL(target || adapted) per query row.
LoRA (rank r, B = 0, PEFT's A init) and SingLoRA (rank 2r, the project's init_A_ / singlora_matmul /
ramp) have the same trainable-parameter count on these square layers: 2 r d per projection.
Each method is swept over learning rates; every (method, lr) runs all seeds at once (the seed is a
batch dimension of every tensor; AdamW is elementwise, so the seeds stay independent).

    python experiments/synthetic_attention.py                    # defaults: docs/SYNTHETIC.md
    python experiments/synthetic_attention.py --seed_offset 10 \\
        --output results/synthetic/synthetic_attention_seeds10.json --plot ''
    python experiments/synthetic_attention.py --seeds 2 --steps 50 --dim 16 --rank 2
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
from synthetic_common import Adapters as BatchedAdapters  # noqa: E402
from synthetic_common import (ROOT, Method, check_positive, grid_and_legend, machine, parse_config,  # noqa: E402
                              pyplot, run_and_print, save_figure, save_results, seed_range, with_threads)
from dreambooth_singlora.errors import UserError, cli_entry  # noqa: E402
from dreambooth_singlora.singlora import singlora_matmul  # noqa: E402

METHODS = ("lora", "singlora")
TARGETS = ("general", "psd")


@dataclass
class Config:
    """One experiment: the problem, the adapters, the sweep. Every field is a CLI flag."""

    seeds: int = field(default=10, metadata={"help": "number of seeds (seed_offset .. seed_offset+seeds-1); each "
                                                     "seed draws its own frozen layer, target, data and adapter init"})
    seed_offset: int = field(default=0, metadata={"help": "first seed: a second run with another offset checks "
                                                          "which results hold from one set of seeds to another"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps per run"})
    dim: int = field(default=64, metadata={"help": "model width d (W_q, W_k are d x d; one head, d_head = d)"})
    rank: int = field(default=4, metadata={"help": "LoRA rank r; SingLoRA gets rank 2r (equal parameter count)"})
    lrs: tuple = field(default=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                       metadata={"help": "AdamW learning rates swept for each method"})
    targets: tuple = field(default=TARGETS, metadata={
        "help": "target perturbations: 'general' (dQ = s U V^T, U, V random orthonormal d x k) and/or "
                "'psd' (dQ = s U U^T, symmetric PSD: inside SingLoRA's update class)"})
    target_rank: int = field(default=0, metadata={"help": "rank k of dQ and dK (0: k = --rank)"})
    target_scale: float = field(default=2.0, metadata={
        "help": "s: the nonzero singular values of dQ, dK (W_q, W_k have entries N(0, 1/d), top singular value ~2)"})
    tokens: int = field(default=32, metadata={"help": "tokens n per sequence"})
    train_sequences: int = field(default=256, metadata={"help": "random training sequences per seed"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step, drawn from the training set"})
    eval_sequences: int = field(default=64, metadata={"help": "fixed held-out sequences the loss is reported on"})
    eval_every: int = field(default=20, metadata={"help": "steps between loss-curve points"})
    ramp_steps: int = field(default=-1, metadata={"help": "SingLoRA ramp T (u = min(t/T, 1)); -1: 10%% of --steps "
                                                          "(the project's default fraction); 0: no ramp"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (diffusers' default)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (the tensors are small: on a shared "
                                                      "2-core machine 1 thread ran 5x faster than 2)"})
    output: str = field(default=os.path.join(ROOT, "results", "synthetic", "synthetic_attention.json"),
                        metadata={"help": "results JSON"})
    plot: str = field(default=os.path.join(ROOT, "assets", "synthetic_attention.png"),
                      metadata={"help": "figure path ('' = no plot)"})

    def __post_init__(self):
        self.lrs, self.targets = tuple(float(x) for x in self.lrs), tuple(self.targets)
        check_positive(self, ("seeds", "steps", "dim", "rank", "tokens", "threads", "train_sequences", "batch_size",
                              "eval_sequences", "eval_every"))
        if self.seed_offset < 0:
            raise UserError(f"--seed_offset must be >= 0, got {self.seed_offset}")
        if 2 * self.rank > self.dim:
            raise UserError(f"--rank {self.rank}: SingLoRA's rank 2r must be <= --dim {self.dim}")
        if self.target_rank == 0:
            self.target_rank = self.rank
        if not 1 <= self.target_rank <= self.dim:
            raise UserError(f"--target_rank must be in 1..{self.dim} (0 = --rank), got {self.target_rank}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise UserError(f"--lrs must be positive numbers, got {self.lrs}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise UserError(f"unknown --targets {bad}; valid: {', '.join(TARGETS)}")
        if self.ramp_steps < 0:
            self.ramp_steps = self.steps // 10


# ---------------------------------------------------------------- the problem


def orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:  # (d, k), Q of a Gaussian's QR
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0]


def make_problem(cfg: Config, target: str, seed: int) -> dict:
    """Seed `seed`'s frozen layer, hidden target, training and held-out sequences (the same for every method and lr)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + TARGETS.index(target))
    d, k, s = cfg.dim, cfg.target_rank, cfg.target_scale
    Wq, Wk = torch.randn(d, d, generator=g) / math.sqrt(d), torch.randn(d, d, generator=g) / math.sqrt(d)
    deltas = []
    for _ in range(2):  # dQ, dK
        U = orthonormal(d, k, g)
        V = U if target == "psd" else orthonormal(d, k, g)
        deltas.append(s * U @ V.T)  # (d, d), rank k, singular values s
    X_train = torch.randn(cfg.train_sequences, cfg.tokens, d, generator=g)  # tokens ~ N(0, I_d)
    X_eval = torch.randn(cfg.eval_sequences, cfg.tokens, d, generator=g)
    return {"Wq": Wq, "Wk": Wk, "Wq_t": Wq + deltas[0], "Wk_t": Wk + deltas[1],
            "X_train": X_train, "X_eval": X_eval}


def stack(problems: list[dict]) -> dict:  # seed becomes the leading dimension of every tensor
    return {key: torch.stack([p[key] for p in problems]) for key in problems[0]}


def attention_logp(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log softmax(q k^T / sqrt(d)) over keys: (S, B, n, d) x2 -> (S, B, n, n)."""
    return torch.log_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def kl_per_seed(logp_target: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(target || adapted) summed over keys, averaged over query rows and sequences: (S,)."""
    return (logp_target.exp() * (logp_target - logp)).sum(-1).mean(dim=(1, 2))


@torch.no_grad()
def frozen_outputs(P: dict, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base q, k (S, B, n, d) and the target's attention log-probs (S, B, n, n) for inputs X (S, B, n, d).

    Projections follow nn.Linear: q = x W_q^T. All four in one bmm.
    """
    S, B, n, d = X.shape
    W = torch.cat([P["Wq"], P["Wk"], P["Wq_t"], P["Wk_t"]], dim=1).transpose(1, 2)  # (S, d, 4d)
    q, k, q_t, k_t = torch.bmm(X.reshape(S, B * n, d), W).reshape(S, B, n, 4, d).unbind(3)
    return q, k, attention_logp(q_t, k_t)


# ---------------------------------------------------------------- the adapters


class Adapters:
    """Trainable adapters of one method on q and k for all seeds at once (seed = dim 0 of every parameter).

    The parameters, their init (LoRA: B = 0, PEFT's A; SingLoRA: the project's init_A_('width')) and the
    ramp u(t) are synthetic_common.Adapters' with one run per seed; here they act on minibatches of
    sequences, (S, B, n, d).
    """

    def __init__(self, method: str, cfg: Config, seeds: list[int]):
        self.method, self.d = method, cfg.dim
        self.rank = cfg.rank if method == "lora" else 2 * cfg.rank
        self.scale = 1.0  # alpha / r with alpha = r: the project's default for both methods
        self.batched = BatchedAdapters(Method(method, method, self.rank, ramp_steps=cfg.ramp_steps), cfg.dim, seeds)
        self.params = self.batched.params  # {"q": [A, B] or [A], "k": ...}, (S, ...) each

    def parameters(self) -> list[torch.Tensor]:
        return [p for ps in self.params.values() for p in ps]

    def count_per_seed(self) -> dict[str, int]:
        """Trainable entries of one seed's adapters, per projection, read from the tensors."""
        return self.batched.count_per_run()

    def u(self, step: int) -> float:
        """The ramp factor u(t) after `step` optimizer steps (1 for LoRA)."""
        return self.batched.u(step)

    def delta(self, proj: str, X: torch.Tensor, u: float) -> torch.Tensor:
        """The adapter's output for input X (S, B, n, d) -> (S, B, n, d)."""
        S, B, n, d = X.shape
        if self.method == "lora":
            A, Bm = self.params[proj]
            h = X @ A.transpose(1, 2).unsqueeze(1)  # (S, B, n, r)
            return self.scale * h @ Bm.transpose(1, 2).unsqueeze(1)
        (A,) = self.params[proj]
        out = singlora_matmul(X.reshape(S, B * n, d), A, d, d, u * self.scale)  # (S, B n, d)
        return out.reshape(S, B, n, d)

    def logp(self, X: torch.Tensor, q0: torch.Tensor, k0: torch.Tensor, u: float) -> torch.Tensor:
        """Adapted attention log-probs for inputs X whose frozen projections are q0, k0."""
        return attention_logp(q0 + self.delta("q", X, u), k0 + self.delta("k", X, u))


# ---------------------------------------------------------------- one run: a method at one lr, all seeds


def train(cfg: Config, method: str, lr: float, P: dict, seeds: list[int]) -> dict:
    """Train `method` at learning rate `lr` for cfg.steps on every seed; held-out KL curve (S, points)."""
    ad = Adapters(method, cfg, seeds)
    opt = torch.optim.AdamW(ad.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    q0_tr, k0_tr, logp_tr = frozen_outputs(P, P["X_train"])  # (S, N, n, d) x2, (S, N, n, n)
    q0_ev, k0_ev, logp_ev = frozen_outputs(P, P["X_eval"])
    draws = [torch.Generator().manual_seed(104_729 * s + 17) for s in seeds]  # minibatch order: same every run
    rows = torch.arange(len(seeds))[:, None]  # (S, 1)
    curve_steps, curve = [], []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            curve.append(kl_per_seed(logp_ev, ad.logp(P["X_eval"], q0_ev, k0_ev, ad.u(step))))
        curve_steps.append(step)

    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            evaluate(step)
        # data: each seed draws its own minibatch (with replacement) from its training set
        idx = torch.stack([torch.randint(cfg.train_sequences, (cfg.batch_size,), generator=g) for g in draws])
        X, q0, k0, logp_target = (t[rows, idx] for t in (P["X_train"], q0_tr, k0_tr, logp_tr))
        # forward: u(t) counts the optimizer steps taken so far
        loss = kl_per_seed(logp_target, ad.logp(X, q0, k0, ad.u(step)))  # (S,)
        # backward + step: the sum keeps each seed's gradient its own
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    evaluate(cfg.steps)
    return {"steps": curve_steps, "kl": torch.stack(curve, dim=1), "params": ad.count_per_seed(),
            "rank": ad.rank}


# ---------------------------------------------------------------- sweep, table, plot


def summarize(kl: torch.Tensor) -> dict:
    """Final-loss statistics over seeds; a seed whose loss is not finite counts as diverged."""
    final = kl[:, -1]
    ok = torch.isfinite(final)
    fin = final[ok]
    q25, q50, q75 = (float(torch.quantile(final, q)) if ok.all() else float("nan") for q in (0.25, 0.5, 0.75))
    return {"final_per_seed": [float(x) for x in final],
            "final_median": q50, "final_q25": q25, "final_q75": q75,
            "final_mean": float(fin.mean()) if ok.all() else float("nan"),
            "final_std": float(fin.std(unbiased=True)) if ok.all() and len(fin) > 1 else float("nan"),
            "diverged": int((~ok).sum())}


def fmt_loss(r: dict) -> str:
    if r["diverged"]:
        return f"diverged on {r['diverged']}/{len(r['final_per_seed'])} seeds"
    return f"{r['final_median']:.2e} [{r['final_q25']:.2e}, {r['final_q75']:.2e}]"


def markdown_tables(res: dict) -> str:
    lines = []
    for target, tr in res["targets"].items():
        lines += [f"Target `{target}` (initial KL {tr['initial_mean']:.3e} ± {tr['initial_std']:.1e}); "
                  f"final KL, median [25%, 75%] over {res['config']['seeds']} seeds "
                  f"{res['config']['seed_offset']}..{res['config']['seed_offset'] + res['config']['seeds'] - 1}:", "",
                  "| learning rate | " + " | ".join(f"{m} (r={tr['methods'][m]['rank']})" for m in METHODS)
                  + " | seeds with SingLoRA lower |",
                  "|---:|" + "---:|" * (len(METHODS) + 1)]
        for lr in res["config"]["lrs"]:
            cells = []
            for m in METHODS:
                r = tr["methods"][m]["by_lr"][repr(lr)]
                mark = "**" if lr == tr["methods"][m]["best_lr"] else ""
                cells.append(f"{mark}{fmt_loss(r)}{mark}")
            pairs = zip(*(tr["methods"][m]["by_lr"][repr(lr)]["final_per_seed"] for m in ("lora", "singlora")))
            wins_lr = sum(s < lo for lo, s in pairs)  # paired: a seed is the same problem for both methods
            lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {wins_lr}/{res['config']['seeds']} |")
        best = " ; ".join(f"{m}: lr {tr['methods'][m]['best_lr']:g} -> "
                          f"{fmt_loss(tr['methods'][m]['by_lr'][repr(tr['methods'][m]['best_lr'])])}"
                          for m in METHODS)
        wins = tr["paired_singlora_better"]
        lines += ["", f"Best per method (bold): {best}; SingLoRA lower than LoRA on "
                      f"{wins}/{res['config']['seeds']} seeds at the best learning rates.", ""]
    return "\n".join(lines)


def make_plot(res: dict, curves: dict, path: str) -> None:
    plt = pyplot()
    targets = list(res["targets"])
    colors = {"lora": "tab:blue", "singlora": "tab:red"}
    fig, axes = plt.subplots(len(targets), 2, figsize=(10, 3.6 * len(targets)), squeeze=False)
    for row, target in enumerate(targets):
        tr = res["targets"][target]
        ax_c, ax_lr = axes[row]
        for m in METHODS:
            best = tr["methods"][m]["best_lr"]
            steps, kl = curves[target][m][best]
            logkl = kl.clamp_min(1e-12).log10()  # band: mean ± std of log10 KL over seeds
            mu, sd = logkl.mean(0), logkl.std(0) if kl.shape[0] > 1 else torch.zeros_like(logkl[0])
            ax_c.plot(steps, 10 ** mu, color=colors[m], label=f"{m} r={tr['methods'][m]['rank']}, lr {best:g}")
            ax_c.fill_between(steps, 10 ** (mu - sd), 10 ** (mu + sd), color=colors[m], alpha=0.2)
            lrs = res["config"]["lrs"]
            by = [tr["methods"][m]["by_lr"][repr(lr)]["final_per_seed"] for lr in lrs]
            q = torch.tensor(by).quantile(torch.tensor([0.25, 0.5, 0.75]), dim=1)  # (3, lrs)
            ax_lr.errorbar(lrs, q[1], yerr=[q[1] - q[0], q[2] - q[1]], color=colors[m], marker="o", capsize=3, label=m)
        ax_c.set(yscale="log", xlabel="optimizer step", ylabel="held-out KL",
                 title=f"target '{target}': best lr per method (geo. mean, ±1 sd band)")
        ax_lr.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=f"KL after {res['config']['steps']} steps",
                  title=f"target '{target}': final KL vs lr (median, bars 25-75%)")
        grid_and_legend((ax_c, ax_lr), fontsize=8)
    fig.suptitle(f"LoRA vs SingLoRA, equal parameters ({res['params_per_seed']['lora']} each), "
                 f"d={res['config']['dim']}, {res['config']['seeds']} seeds from {res['config']['seed_offset']}",
                 fontsize=10)
    save_figure(fig, path)


@with_threads
def run(cfg: Config) -> dict:
    """The whole sweep: results dict (what --output holds); writes the JSON and the plot."""
    t0 = time.time()
    seeds = seed_range(cfg)
    res = {"config": dataclasses.asdict(cfg), "targets": {}, "machine": machine()}
    res["config"]["lrs"], res["config"]["targets"] = list(cfg.lrs), list(cfg.targets)
    curves: dict = {}
    for target in cfg.targets:
        P = stack([make_problem(cfg, target, s) for s in seeds])
        tr = {"methods": {}}
        curves[target] = {}
        for m in METHODS:
            mr = {"by_lr": {}}
            curves[target][m] = {}
            for lr in cfg.lrs:
                out = train(cfg, m, lr, P, seeds)
                kl = out["kl"]
                curves[target][m][lr] = (out["steps"], kl)
                mr["by_lr"][repr(lr)] = {**summarize(kl), "curve_mean": [float(x) for x in kl.mean(0)],
                                         "curve_per_seed": [[float(f"{x:.4g}") for x in row] for row in kl]}
                mr["rank"], mr["params_per_seed"] = out["rank"], out["params"]
                print(f"  {target:8s} {m:9s} lr {lr:<8g} final KL {fmt_loss(mr['by_lr'][repr(lr)])}", flush=True)
            finite = {lr: r["final_median"] for lr, r in mr["by_lr"].items() if math.isfinite(r["final_median"])}
            mr["best_lr"] = float(min(finite, key=finite.get)) if finite else cfg.lrs[0]
            tr["methods"][m] = mr
        first = curves[target][METHODS[0]][cfg.lrs[0]][1][:, 0]  # step 0: both methods are the base layer
        tr["initial_mean"], tr["initial_std"] = float(first.mean()), float(first.std()) if len(first) > 1 else 0.0
        best = {m: torch.tensor(tr["methods"][m]["by_lr"][repr(tr["methods"][m]["best_lr"])]["final_per_seed"])
                for m in METHODS}
        tr["paired_singlora_better"] = int((best["singlora"] < best["lora"]).sum())
        tr["curve_steps"] = curves[target][METHODS[0]][cfg.lrs[0]][0]
        res["targets"][target] = tr
    counts = {m: sum(res["targets"][cfg.targets[0]]["methods"][m]["params_per_seed"].values()) for m in METHODS}
    assert counts["lora"] == counts["singlora"] == 4 * cfg.rank * cfg.dim, counts
    res["params_per_seed"] = counts
    return save_results(res, cfg, t0, lambda path: make_plot(res, curves, path))


@cli_entry
def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    print(f"LoRA r={cfg.rank} vs SingLoRA r={2 * cfg.rank} on q,k of a d={cfg.dim} attention layer; "
          f"{cfg.seeds} seeds x {len(cfg.lrs)} lrs x {cfg.steps} steps; SingLoRA ramp T={cfg.ramp_steps}", flush=True)
    return run_and_print(run, cfg, markdown_tables, params_label="Trainable parameters per seed")


if __name__ == "__main__":
    main()
