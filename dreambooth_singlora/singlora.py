"""SingLoRA math (arXiv 2507.05566): one trainable matrix A per adapted linear layer.

    W = W0 + (alpha / r) * u(t) * A[:d_out] @ A[:d_in]^T,      A: (max(d_in, d_out), r)
    u(t) = min(t / T, 1),  t = optimizer steps taken,  T = ramp_steps (T = 0: u = 1 always)

The one formula covers square layers (a symmetric update) and both non-square directions
(d_in > d_out, as in SD1.5's 768 -> 320 cross-attention keys, and d_in < d_out, 768 -> 1280).
Pure torch: nothing here knows about diffusers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import INITS  # the init names live with the config that offers them


def ramp(step: int, ramp_steps: int) -> float:
    """u(t) = min(t / T, 1) for t = `step` optimizer steps; `ramp_steps` T = 0 means no ramp (u = 1)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if ramp_steps <= 0:
        return 1.0
    return min(step / ramp_steps, 1.0)


def init_A_(A: torch.Tensor, d_in: int, init: str = "width") -> torch.Tensor:
    """Initialise A (..., D, r) in place: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in by `init`.

    "width": fan-in = the layer's input width d_in (entries of variance 1/(3 d_in), as PEFT initialises LoRA's A),
    so A A^T starts small (diagonal ~ r / (3 d_in)). "rank": fan-in = r, what the public SingLoRA code does; then
    A A^T starts near I/3, a huge update that only the ramp u(t) hides."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    fan_in = d_in if init == "width" else A.shape[-1]
    bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform_(a=sqrt(5)), PEFT's LoRA-A init
    with torch.no_grad():
        return A.uniform_(-bound, bound)


def delta_weight(A: torch.Tensor, d_in: int, d_out: int, scale: float | torch.Tensor) -> torch.Tensor:
    """The full update scale * A[:d_out] A[:d_in]^T, (d_out, d_in). Only for merging and export."""
    return scale * (A[:d_out] @ A[:d_in].T)


def singlora_matmul(x: torch.Tensor, A: torch.Tensor, d_in: int, d_out: int, scale) -> torch.Tensor:
    """delta(x) = scale * (x @ A[:d_in]) @ A[:d_out]^T through two thin matmuls, never the full delta.

    x: (..., d_in); A: (D, r) -> (..., d_out). A: (B, D, r) with x: (B, N, d_in) applies sample b's own adapter
    to x[b] (batched adapters)."""
    if A.dim() == 2:
        D = A.shape[0]  # slice only the side that needs it: a full-range slice still costs a backward copy
        h = x @ (A if d_in == D else A[:d_in])  # (..., r)
        return (h * scale) @ (A if d_out == D else A[:d_out]).T  # (..., d_out)
    h = torch.bmm(x, A[:, :d_in])  # (B, N, r)
    return torch.bmm(h * scale, A[:, :d_out].transpose(1, 2))  # (B, N, d_out)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or in its own dtype if wider (fp64: the tests' equivalence checks run in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class SingLoRA(nn.Module):
    """The SingLoRA term of one linear layer d_in -> d_out: forward(x) = delta W x. Its ramp u is set by the
    caller from the optimizer step (`set_ramp`): the module holds no step counter of its own."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, init: str = "width"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(max(d_in, d_out), rank))
        init_A_(self.A, d_in, init)
        self.register_buffer("u", torch.zeros(()), persistent=False)
        self.register_buffer("coef", torch.zeros(()), persistent=False)  # scale * u, kept ready for forward
        self._u_set = 0.0

    def set_ramp(self, u: float) -> None:
        if u != self._u_set:  # past the ramp u stays 1: no kernel launches per step
            self.u.fill_(u)
            self.coef.fill_(self.scale * u)
            self._u_set = u

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        # one cast of A (not one per matmul); its gradient flows back to the fp32 A
        return singlora_matmul(x, self.A.to(compute_dtype(x)), self.d_in, self.d_out, self.coef)

    def delta_weight(self) -> torch.Tensor:  # (d_out, d_in), fp32 (or wider)
        return delta_weight(at_least_fp32(self.A), self.d_in, self.d_out, self.scale * at_least_fp32(self.u))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scale={self.scale:g}"
