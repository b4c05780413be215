"""Shared pieces of the synthetic experiments: a random attention-pattern problem, LoRA / LoRA+ / SingLoRA
adapters on its W_q and W_k, and a batched AdamW, with many runs trained at once.

A "run" is one (learning rate, seed) pair. Runs of one method train as batches: every tensor has a
leading run dimension R, and each run has its own learning rate. The loss is the sum of the per-run
losses and AdamW is elementwise, so each run follows the trajectory a separate run would
(tests/test_synthetic_section5.py checks this against torch.optim.AdamW).

The adapter math comes from the project (`dreambooth_singlora.singlora`: init_A_, ramp,
singlora_matmul); nothing here re-implements SingLoRA's update.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dreambooth_singlora.errors import UserError  # noqa: E402
from dreambooth_singlora.singlora import init_A_, ramp, singlora_matmul  # noqa: E402


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One adapter variant: 'lora' (delta W = B A) or 'singlora' (delta W = u(t) A A^T), scale alpha/r = 1."""

    name: str  # label in tables and JSON
    kind: str  # "lora" or "singlora"
    rank: int
    init: str = "width"  # SingLoRA only: init_A_'s fan-in choice ('width' or 'rank')
    b_lr_ratio: float = 1.0  # LoRA only: B's learning rate = lr x this (16 = LoRA+, the project's default)
    ramp_steps: int = 0  # SingLoRA only: T of u(t) = min(t/T, 1); 0 = no ramp

    def params_per_projection(self, d: int) -> int:
        """Trainable entries on one square d x d projection: LoRA 2 r d (A: r x d, B: d x r), SingLoRA r d."""
        return 2 * self.rank * d if self.kind == "lora" else self.rank * d


# ---------------------------------------------------------------- the problem


@contextmanager
def torch_threads(n: int):
    """torch's thread count is `n` inside the block and what it was afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_problem(seed: int, tokens: int, dim: int) -> dict:
    """Seed `seed`'s fixed input, frozen layer and target (the same for every method and learning rate).

    X: (n, d), entries N(0, 1). W_q, W_k: (d, d), entries N(0, 1/d), so the base logits
    q.k / sqrt(d) are O(1) at every width. Target: softmax over keys of N(0, 1) logits, (n, n); it
    does not depend on d.
    """
    g = torch.Generator().manual_seed(1_000_003 * seed + 12_345)
    X = torch.randn(tokens, dim, generator=g)  # (n, d)
    Wq = torch.randn(dim, dim, generator=g) / math.sqrt(dim)  # (d_out, d_in), as nn.Linear
    Wk = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    target = torch.softmax(torch.randn(tokens, tokens, generator=g), dim=-1)  # (n, n), rows sum to 1
    return {"X": X, "Wq": Wq, "Wk": Wk, "target": target}


def stack_problems(seeds: list[int], tokens: int, dim: int) -> dict:
    """Problems of `seeds` (repeats allowed: one row per run), stacked: (R, ...)."""
    cache = {s: make_problem(s, tokens, dim) for s in set(seeds)}
    P = {k: torch.stack([cache[s][k] for s in seeds]) for k in cache[seeds[0]]}
    with torch.no_grad():  # frozen projections, computed once: q0 = X W_q^T
        P["q0"] = P["X"] @ P["Wq"].transpose(1, 2)  # (R, n, d)
        P["k0"] = P["X"] @ P["Wk"].transpose(1, 2)
    return P


def attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over keys: (R, n, d) x2 -> (R, n, n)."""
    return torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1]), dim=-1)


def frobenius(P: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||P - target||_F per run: (R, n, n) x2 -> (R,)."""
    return (P - target).pow(2).sum(dim=(1, 2)).sqrt()


# ---------------------------------------------------------------- adapters


class Adapters:
    """One method's adapters on q and k for R runs (run = dim 0 of every parameter).

    `seeds[i]` fixes run i's adapter init, so a seed starts from the same point at every learning rate.
    """

    def __init__(self, method: Method, dim: int, seeds: list[int]):
        self.method, self.d = method, dim
        R, d, r = len(seeds), dim, method.rank
        self.params: dict[str, list[torch.Tensor]] = {}
        for p_i, proj in enumerate(("q", "k")):
            if method.kind == "lora":
                A = torch.empty(R, r, d)  # (R, r, d_in)
                B = torch.zeros(R, d, r)  # (R, d_out, r): zero, so the adapted layer starts at the base
                bound = 1.0 / math.sqrt(d)  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, d_in)
                for i, seed in enumerate(seeds):
                    with torch.random.fork_rng():
                        torch.manual_seed(7919 * seed + p_i)
                        A[i].uniform_(-bound, bound)
                self.params[proj] = [A.requires_grad_(), B.requires_grad_()]
            elif method.kind == "singlora":
                A = torch.empty(R, d, r)  # (R, max(d_in, d_out), r)
                for i, seed in enumerate(seeds):
                    with torch.random.fork_rng():  # the project's init draws from the global generator
                        torch.manual_seed(7919 * seed + p_i)
                        init_A_(A[i], d_in=d, init=method.init)
                self.params[proj] = [A.requires_grad_()]
            else:
                raise ValueError(f"unknown method kind {method.kind!r}")

    def groups(self, lr: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, per-run learning rate broadcastable to it) pairs; LoRA's B gets lr x b_lr_ratio."""
        lr = lr.view(-1, 1, 1)  # (R, 1, 1)
        out = []
        for ps in self.params.values():
            if self.method.kind == "lora":
                out += [(ps[0], lr), (ps[1], lr * self.method.b_lr_ratio)]
            else:
                out += [(ps[0], lr)]
        return out

    def count_per_run(self) -> dict[str, int]:
        """Trainable entries of one run's adapters per projection, read from the tensors."""
        return {proj: sum(p[0].numel() for p in ps) for proj, ps in self.params.items()}

    def delta(self, proj: str, X: torch.Tensor, u: float) -> torch.Tensor:
        """The adapter's output delta W x for inputs X (R, n, d) -> (R, n, d); scale alpha/r = 1."""
        if self.method.kind == "lora":
            A, Bm = self.params[proj]
            return torch.bmm(torch.bmm(X, A.transpose(1, 2)), Bm.transpose(1, 2))  # (R, n, r) -> (R, n, d)
        (A,) = self.params[proj]
        return singlora_matmul(X, A, self.d, self.d, u)  # (R, n, d), u(t) * A A^T x

    def u(self, step: int) -> float:
        """The ramp factor at `step` optimizer steps taken (1 for LoRA)."""
        return ramp(step, self.method.ramp_steps) if self.method.kind == "singlora" else 1.0

    def loss(self, P: dict, step: int) -> torch.Tensor:
        """Per-run loss ||softmax((q0 + dq)(k0 + dk)^T / sqrt(d)) - target||_F: (R,)."""
        u = self.u(step)
        q = P["q0"] + self.delta("q", P["X"], u)  # (R, n, d)
        k = P["k0"] + self.delta("k", P["X"], u)
        return frobenius(attention(q, k), P["target"])


# ---------------------------------------------------------------- optimiser


class BatchedAdamW:
    """torch.optim.AdamW (decoupled weight decay, bias correction, no amsgrad), with a per-run learning rate.

    `groups`: (parameter (R, ...), lr broadcastable to it). The update order follows torch's
    single-tensor AdamW, so with one learning rate it matches torch.optim.AdamW.
    """

    def __init__(self, groups, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups, self.wd, (self.b1, self.b2), self.eps = groups, weight_decay, betas, eps
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p, _ in groups]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        bc1, bc2_sqrt = 1 - self.b1 ** self.t, math.sqrt(1 - self.b2 ** self.t)
        for (p, lr), (m, v) in zip(self.groups, self.state):
            g = p.grad
            p.mul_(1 - lr * self.wd)
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.sub_((lr / bc1) * m / denom)

    def zero_grad(self) -> None:
        for p, _ in self.groups:
            p.grad = None


def train(method: Method, lrs: list[float], seeds: list[int], tokens: int, dim: int, steps: int,
          eval_every: int, weight_decay: float = 1e-2, progress=None, chunk_floats: int = 1 << 21) -> dict:
    """Train `method` at every (lr, seed) for `steps` full-batch AdamW steps.

    The L * S runs go through in chunks of about `chunk_floats` entries per (R, n, d) tensor (the
    runs are independent, so chunking changes nothing but speed: small batches stay in cache).
    Returns {"steps": [t...], "loss": (L, S, points) tensor, "params": per-projection counts}; the
    loss at step t is the one of the parameters after t steps (point 0 is the unadapted layer).
    """
    L, S = len(lrs), len(seeds)
    runs = [(lr, s) for lr in lrs for s in seeds]  # row l * S + s
    per = max(1, chunk_floats // (tokens * dim))
    chunks = [runs[i:i + per] for i in range(0, len(runs), per)]
    out = [train_runs(method, c, tokens, dim, steps, eval_every, weight_decay) for c in chunks]
    if progress is not None:
        progress.update(steps)
    return {"steps": out[0]["steps"], "loss": torch.cat([o["loss"] for o in out]).view(L, S, -1),
            "params": out[0]["params"]}


def train_runs(method: Method, runs: list[tuple[float, int]], tokens: int, dim: int, steps: int,
               eval_every: int, weight_decay: float) -> dict:
    """Train the (lr, seed) `runs` of `method` as one batch: loss (R, points) at the recorded steps."""
    lrs, seeds = [lr for lr, _ in runs], [s for _, s in runs]
    P = stack_problems(seeds, tokens, dim)  # (R, ...)
    ad = Adapters(method, dim, seeds)
    opt = BatchedAdamW(ad.groups(torch.tensor(lrs)), weight_decay=weight_decay)
    curve_steps, curve = [], []
    for step in range(steps + 1):
        loss = ad.loss(P, step)  # (R,)
        if step % eval_every == 0 or step == steps:
            curve_steps.append(step)
            curve.append(loss.detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        loss.nan_to_num(nan=0.0, posinf=0.0).sum().backward()  # a diverged run stops moving; the others are unaffected
        opt.step()
    return {"steps": curve_steps, "loss": torch.stack(curve, dim=1), "params": ad.count_per_run()}


# ---------------------------------------------------------------- statistics


def quartiles(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """25/50/75% quantiles along `dim` (non-finite values count as +inf, i.e. as the worst): (3, ...)."""
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf")))
    return torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]), dim=dim)


def r4(x) -> float | None:
    """A float rounded to 4 significant digits for the JSON (non-finite -> None)."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def diverged(loss: torch.Tensor) -> torch.Tensor:
    """(..., points) -> (...) bool: final loss non-finite or above the starting loss."""
    final, start = loss[..., -1], loss[..., 0]
    return ~torch.isfinite(final) | (final > start)


# ---------------------------------------------------------------- CLI


def parse_config(cls, argv, doc: str):
    """argparse flags from the dataclass `cls` (help in each field's metadata) -> an instance of cls."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kw = {"default": f.default, "help": f.metadata["help"]}
        if isinstance(f.default, tuple):
            kw.update(nargs="+", type=type(f.default[0]))
        elif isinstance(f.default, bool):
            kw["type"] = lambda s: {"1": True, "true": True, "0": False, "false": False}[s.lower()]
        else:
            kw["type"] = type(f.default)
        p.add_argument(f"--{f.name}", **kw)
    return cls(**vars(p.parse_args(argv)))


def check_positive(cfg, names) -> None:
    """UserError unless every field in `names` is a positive integer."""
    for name in names:
        if int(getattr(cfg, name)) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")


def check_lrs(lrs) -> None:
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise UserError(f"learning rates must be positive numbers, got {list(lrs)}")


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


# ---------------------------------------------------------------- running a script, its JSON and figure


def seed_range(cfg) -> list[int]:
    """The seeds of a config: cfg.seeds of them from cfg.seed_offset."""
    return list(range(cfg.seed_offset, cfg.seed_offset + cfg.seeds))


def with_threads(run):
    """Decorator for a script's run(cfg): torch uses cfg.threads CPU threads while it runs."""

    @functools.wraps(run)
    def threaded(cfg):
        with torch_threads(cfg.threads):
            return run(cfg)

    return threaded


def save_results(res: dict, cfg, t0: float, make_plot) -> dict:
    """A run's end: res["wall_seconds"] since `t0`; res as JSON to cfg.output and make_plot(cfg.plot), where
    each is set ('' = none). Returns res."""
    res["wall_seconds"] = round(time.time() - t0, 1)
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w") as f:
            json.dump(res, f, indent=1)
    if cfg.plot:
        make_plot(cfg.plot)
    return res


def run_and_print(run, cfg, tables, params_label: str = "") -> dict:
    """A script's main after its banner: res = run(cfg); the wall time (after res["params_per_seed"], under
    `params_label`, where given) and the Markdown tables(res) on stdout. Returns res."""
    res = run(cfg)
    params = f"{params_label}: {res['params_per_seed']} " if params_label else ""
    print(f"\n{params}({res['wall_seconds']} s)\n")
    print(tables(res))
    return res


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported here: the scripts run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_and_legend(axes, fontsize: float) -> None:
    """Every axis of `axes`: a light grid on major and minor ticks, and its legend."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=fontsize)


def save_figure(fig, path: str) -> None:
    """Lay `fig` out tightly, write it to `path` (its folder made) at 90 dpi, and close it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
