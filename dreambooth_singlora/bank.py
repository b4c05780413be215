"""Many subjects on one frozen UNet: a bank of S adapters per adapted projection, routed per sample.

SingLoRA: each adapted projection holds A of shape (S, D, r), one row per subject. LoRA and LoRA+
(PEFT's layers): lora_A (S, r, d_in) and lora_B (S, d_out, r). Before a UNet call,
`Routing.route(index)` says which row each sample of the batch uses (index: (B,)); every bank
processor then gathers its rows [index] and applies them with batched matmuls. No per-subject
Python loop runs inside the UNet. DoRA does not bank (its per-row weight norm would need the full
weight per subject): its subjects train and render one at a time.

    add_adapter(unet, config)            # the single adapter: every row's start, and the staging slot
    routing = add_bank(unet, n)          # -> a bank of n copies of it
    routing.route(torch.tensor([0, 0, 1, 2]))
    unet(latents, t, emb)                # samples 0, 1 through row 0, sample 2 through row 1, ...

The single adapter stays in place, frozen, as a staging slot (`row_to_staging`, `staging_to_row`).
With no index routed, the UNet behaves exactly as with the staging adapter alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import PEFT_NAME, adapter_state, attention_modules, get_config, is_merged, set_processor
from .errors import UserError
from .processor import AdapterAttnProcessor, SingLoRAAttnProcessor, key_of
from .singlora import compute_dtype, singlora_matmul

#: methods whose subjects batch in a bank; DoRA's per-row weight norm does not
BANKED = ("singlora", "lora", "loraplus")


class Routing:
    """Which bank row each sample of the next UNet calls uses, and each row's scale * u: one object shared by
    all bank processors of a UNet. `coef` (S,) is (alpha / r) * u per row; `route(index)` with index (B,) on the
    UNet's device; `route(None)` turns routing off."""

    def __init__(self, coef: torch.Tensor):
        self.coef = coef  # (S,) fp32 (the default dtype)
        self.index: torch.Tensor | None = None
        self._per_sample: dict = {}

    def route(self, index: torch.Tensor | None) -> None:
        self.index = index
        self._refresh()

    def set_coef(self, coef) -> None:
        """Set every row's (alpha / r) * u: a float (all rows) or a (S,) tensor."""
        if torch.is_tensor(coef):
            self.coef.copy_(coef)
        else:
            self.coef.fill_(coef)
        self._refresh()

    def _refresh(self) -> None:
        # each sample's coefficient, (B, 1, 1) per dtype, computed here, outside the UNet: the processors
        # only read it (under torch.compile nothing in the graph mutates Python state, so nothing recompiles)
        self._per_sample = {}
        if self.index is not None:
            c = self.coef[self.index].view(-1, 1, 1)
            self._per_sample = {dt: c.to(dt) for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}

    def sample_coef(self, dtype: torch.dtype) -> torch.Tensor:  # -> (B, 1, 1)
        return self._per_sample[dtype]


class BankProcessor(AdapterAttnProcessor):
    """Wraps the processor it replaces (`inner`): unrouted calls go to it unchanged; routed calls run
    `attention()` with each sample's own bank row on the adapted projections (`routed_project`).

    `staging` maps each bank key to (its state-dict suffix, the single adapter's tensor); each bank
    (n, *shape) is a trainable stack of copies of that tensor, which stays in place, frozen."""

    def __init__(self, inner, targets, staging: dict, n: int, routing: Routing, use_xformers: bool):
        super().__init__()
        self.inner, self.targets, self.staging, self.routing = inner, tuple(targets), staging, routing
        self.use_xformers = use_xformers
        self.banks = nn.ParameterDict()  # n rows, each a copy of the staging tensor (fp32, trainable)
        for key, (_, t) in staging.items():
            t.requires_grad_(False)
            self.banks[key] = nn.Parameter(t.detach()[None].repeat(n, *([1] * t.dim())))

    @property
    def merged(self) -> bool:
        return bool(getattr(self.inner, "merged", False))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if self.routing.index is None:  # no routing: exactly the staging adapter
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.merged or any(getattr(attn.get_submodule(t), "merged", False) for t in self.targets):
            raise UserError("the staging adapter is merged into the weights: unmerge_adapter(unet) before "
                            "routing samples through the adapter bank")
        if self.routing.index.shape[0] != hidden_states.shape[0]:
            raise UserError(f"routing index has {self.routing.index.shape[0]} entries for a batch of "
                            f"{hidden_states.shape[0]} samples: route one adapter row per sample (with "
                            "classifier-free guidance, repeat the index for the unconditional half)")
        return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def project(self, layer, target, x):
        if target not in self.targets:
            return layer(x)
        coef = self.routing.sample_coef(compute_dtype(x))  # in the dtype the matmuls run in
        return self.routed_project(layer, key_of(target), x, self.routing.index, coef)


class SingLoRABankProcessor(BankProcessor):
    """Routed SingLoRA: sample b's projection is layer(x_b) + coef_b (x_b A_b[:d_in]) A_b[:d_out]^T."""

    def __init__(self, single: SingLoRAAttnProcessor, n: int, routing: Routing):
        staging = {key_of(t): (f"{t}.A", single.adapters[key_of(t)].A) for t in single.targets}
        super().__init__(single, single.targets, staging, n, routing, single.use_xformers)

    def routed_project(self, layer, key, x, index, coef):
        a = self.inner.adapters[key]
        A = self.banks[key][index].to(coef.dtype)  # (B, D, r): sample b's own adapter
        return layer(x) + singlora_matmul(x, A, a.d_in, a.d_out, coef)


class LoRABankProcessor(BankProcessor):
    """Routed LoRA (PEFT's layers in to_q / to_k): sample b's projection is base(x_b) + coef_b B_b A_b x_b, A_b and
    B_b its subject's row: what PEFT's layer computes with that subject loaded (LoRA and LoRA+ differ only in the
    optimizer). `inner` is the stock attention processor."""

    def __init__(self, attn, inner, targets, n: int, routing: Routing, use_xformers: bool):
        staging = {f"{key_of(t)}_{part}": (f"{t}.{part}.weight", getattr(attn.get_submodule(t), part)[PEFT_NAME].weight)
                   for t in targets for part in ("lora_A", "lora_B")}
        super().__init__(inner, targets, staging, n, routing, use_xformers)

    def routed_project(self, layer, key, x, index, coef):
        A = self.banks[f"{key}_lora_A"][index].to(coef.dtype)  # (B, r, d_in)
        B = self.banks[f"{key}_lora_B"][index].to(coef.dtype)  # (B, d_out, r)
        h = torch.bmm(x, A.transpose(1, 2))  # (B, N, r)
        return layer.get_base_layer()(x) + torch.bmm(h * coef, B.transpose(1, 2))


def bank_processors(unet) -> list[BankProcessor]:
    return [a.processor for _, a in attention_modules(unet) if isinstance(a.processor, BankProcessor)]


def add_bank(unet, n: int) -> Routing:
    """Turn the adapter on `unet` (SingLoRA, LoRA or LoRA+) into a bank of n copies of it; returns the routing.
    Only the bank trains (the staging adapter is frozen); its rows start equal to the staging adapter. Calling it
    again (a UNet that already has a bank) replaces the bank with n fresh copies."""
    from diffusers.models.attention_processor import XFormersAttnProcessor

    config = get_config(unet)
    if config is None or config.method not in BANKED:
        raise UserError(f"an adapter bank needs a {', '.join(BANKED)} adapter on the UNet (add_adapter first); "
                        "DoRA subjects train and render one at a time")
    if n < 1:
        raise UserError(f"a bank needs at least one adapter, got {n}")
    if is_merged(unet):
        raise UserError("the adapter is merged into the weights: unmerge_adapter(unet) before add_bank")
    remove_bank(unet)  # a bank already there gives way to the new one
    ref = next(unet.parameters())
    routing = Routing(torch.full((n,), adapter_state(unet).coef, device=ref.device))
    for _, attn in attention_modules(unet):
        if config.method == "singlora":
            proc = SingLoRABankProcessor(attn.processor, n, routing)
        else:
            proc = LoRABankProcessor(attn, attn.processor, config.target_modules, n, routing,
                                     use_xformers=isinstance(attn.processor, XFormersAttnProcessor))
        set_processor(attn, proc)
    return routing


def remove_bank(unet) -> None:
    """Put the staging adapter's own processors back (the bank's rows are dropped)."""
    for _, attn in attention_modules(unet):
        if isinstance(attn.processor, BankProcessor):
            set_processor(attn, attn.processor.inner)


def get_routing(unet) -> Routing:
    procs = bank_processors(unet)
    if not procs:
        raise UserError("this UNet has no adapter bank: add_adapter(unet, config) then add_bank(unet, n)")
    return procs[0].routing


def bank_parameters(unet) -> list[nn.Parameter]:
    """The bank tensors (S, *shape of the single adapter's tensor)."""
    return [b for p in bank_processors(unet) for b in p.banks.values()]


def bank_state_dict(unet) -> dict[str, torch.Tensor]:
    """{"<attention path>.<target>.A" (SingLoRA) or "...<target>.lora_A.weight" (LoRA): (S, ...)}: the
    names a single adapter's tensors have in `adapter_state_dict`."""
    return {f"{name}.{suffix}": a.processor.banks[key] for name, a in attention_modules(unet)
            if isinstance(a.processor, BankProcessor) for key, (suffix, _) in a.processor.staging.items()}


@torch.no_grad()
def row_to_staging(unet, row: int) -> None:
    """Copy bank row `row` into the staging adapter (then save_adapter writes that subject's files)."""
    for p in bank_processors(unet):
        for key, (_, t) in p.staging.items():
            t.copy_(p.banks[key][row])


@torch.no_grad()
def staging_to_row(unet, row: int) -> None:
    """Copy the staging adapter (e.g. one just loaded with load_adapter_state_dict) into bank row `row`."""
    for p in bank_processors(unet):
        for key, (_, t) in p.staging.items():
            p.banks[key][row].copy_(t)


def clip_grad_norm_per_row_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ applied to each bank row on its own: row s's gradients (over all params)
    are scaled by min(1, max_norm / (||g_s|| + 1e-6)), exactly as torch clips one adapter alone.
    Returns the (S,) norms before clipping. No host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (P, S)
    total = torch.linalg.vector_norm(norms, dim=0)  # (S,)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return total
