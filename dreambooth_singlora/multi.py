"""Many subjects on one frozen UNet: a bank of S adapters per adapted projection.

SingLoRA: each adapted projection holds A of shape (S, D, r), one row per subject. LoRA and LoRA+
(through PEFT): lora_A (S, r, d_in) and lora_B (S, d_out, r). Before a UNet call,
`Routing.route(index)` says which adapter each sample of the batch uses (index: (B,) subject
rows); every processor then gathers its bank rows [index] and applies them with two batched
matmuls (bmm). No per-subject Python loop runs inside the UNet. DoRA does not bank (its per-row
weight norm would need the full weight per subject): its subjects run one at a time.

    add_adapter(unet, config)            # the single-subject adapter: every row's start
    routing = add_bank(unet, n)          # -> a bank of n copies
    routing.route(torch.tensor([0, 0, 1, 2]))
    unet(latents, t, emb)                # samples 0, 1 through adapter 0, sample 2 through 1, ...

The single-subject adapter stays in place as a staging slot: `save_subject` copies a row into it
and calls `save_adapter`, `load_subject` reads a saved adapter through it, so files are exactly
those of a single-subject run. With no index routed the UNet behaves exactly as with the staging
adapter alone.

`generate_many` renders many subjects' prompts in mixed batches this way (classifier-free
guidance batched too); `python -m dreambooth_singlora.multi` is its command line.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapter import _PEFT_NAME as PEFT_NAME
from .adapter import (WEIGHTS_NAME, add_adapter, adapter_state_dict, attention_modules, get_config, load_adapter,
                      load_adapter_state_dict, read_adapter, remove_adapter, save_adapter, set_step)
from .config import SingLoRAConfig
from .errors import UserError, cli_entry
from .generate import (PngWriter, batches, check_prompt_length, compiled, generate_images, place_adapter, plan,
                       sample, write_index)
from .processor import SingLoRAAttnProcessor, _key
from .singlora import compute_dtype, singlora_matmul

logger = logging.getLogger("dreambooth_singlora.multi")


# --------------------------------------------------------------------------- the bank

class Routing:
    """Which adapter row each sample of the next UNet calls uses, and each row's scale * u.

    One object shared by all processors of a UNet. `coef` (S,) is (alpha / r) * u per row;
    `route(index)` with index (B,) on the UNet's device; `route(None)` turns routing off.
    """

    def __init__(self, coef: torch.Tensor):
        self.coef = coef  # (S,) fp32
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
        if self.index is None:
            self._per_sample = {}
            return
        c = self.coef[self.index].view(-1, 1, 1)
        self._per_sample = {dt: c.to(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}

    def sample_coef(self, dtype: torch.dtype) -> torch.Tensor:  # -> (B, 1, 1)
        return self._per_sample[dtype]


class BankAttnProcessor(SingLoRAAttnProcessor):
    """The attention of `SingLoRAAttnProcessor` with a bank of n adapters per adapted projection.

    `staging` maps each bank key to (its state-dict suffix, the single adapter's tensor): the single
    adapter stays in place as a staging slot (frozen), each bank (n, *shape) is a trainable stack
    of copies of it. Subclasses apply sample b's own adapter in `routed_delta`."""

    staging: dict

    def resize(self, n: int) -> None:
        """A bank of n rows, each a copy of the staging tensor (fp32, trainable)."""
        self.banks = nn.ParameterDict()
        for key, (_, t) in self.staging.items():
            t.requires_grad_(False)
            self.banks[key] = nn.Parameter(t.detach()[None].repeat(n, *([1] * t.dim())))

    def project(self, layer: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
        index = self.routing.index
        if index is None or target not in self.targets:
            return super().project(layer, target, x)  # no routing: exactly the single adapter
        if self.merged or getattr(layer, "merged", False):  # SingLoRA's flag, or PEFT's layer's
            raise UserError("the staging adapter is merged into the weights: unmerge_adapter(unet) before "
                            "routing samples through the adapter bank")
        if index.shape[0] != x.shape[0]:
            raise UserError(f"routing index has {index.shape[0]} entries for a batch of {x.shape[0]} samples: "
                            "route one adapter row per sample (with classifier-free guidance, repeat the index "
                            "for the unconditional half)")
        dtype = compute_dtype(x)
        return self.routed_delta(layer, _key(target), x, index, dtype, self.routing.sample_coef(dtype))


class MultiSingLoRAAttnProcessor(BankAttnProcessor):
    """`SingLoRAAttnProcessor` with a bank of SingLoRA A per adapted projection, routed per sample."""

    def __init__(self, single: SingLoRAAttnProcessor, n: int, routing: Routing):
        nn.Module.__init__(self)  # take over `single`'s adapters as the staging slot: no new A, no RNG drawn
        self.targets, self.adapters = single.targets, single.adapters
        self.merged, self.use_xformers = single.merged, single.use_xformers
        self.routing = routing  # a plain object, shared: not a submodule
        self.staging = {_key(t): (f"{t}.A", self.adapters[_key(t)].A) for t in self.targets}
        self.resize(n)

    def routed_delta(self, layer, key, x, index, dtype, coef):
        a = self.adapters[key]
        A = self.banks[key][index].to(dtype)  # (B, D, r): sample b's own adapter
        return layer(x) + singlora_matmul(x, A, a.d_in, a.d_out, coef)


class MultiLoRAAttnProcessor(BankAttnProcessor):
    """Stock SDPA attention over PEFT LoRA projections, with a bank of (lora_A, lora_B) per projection.

    Routed, a projection computes base(x) + (alpha / r) * B_b (A_b x) for sample b, with A_b (r, d_in)
    and B_b (d_out, r) its subject's row: what PEFT's LoRA layer computes with that subject loaded
    (LoRA and LoRA+ differ only in the optimizer). Not routed, PEFT's layer runs as is."""

    def __init__(self, attn, targets, n: int, routing: Routing, use_xformers: bool = False):
        nn.Module.__init__(self)
        self.targets, self.adapters = tuple(targets), nn.ModuleDict()
        self.merged, self.use_xformers = False, use_xformers
        self.routing = routing
        self.staging = {}
        for t in self.targets:
            layer = attn.get_submodule(t)
            for part in ("lora_A", "lora_B"):
                self.staging[f"{_key(t)}_{part}"] = (f"{t}.{part}.weight", getattr(layer, part)[PEFT_NAME].weight)
        self.resize(n)

    def routed_delta(self, layer, key, x, index, dtype, coef):
        A = self.banks[f"{key}_lora_A"][index].to(dtype)  # (B, r, d_in)
        B = self.banks[f"{key}_lora_B"][index].to(dtype)  # (B, d_out, r)
        h = torch.bmm(x, A.transpose(1, 2))  # (B, N, r)
        return layer.get_base_layer()(x) + torch.bmm(h * coef, B.transpose(1, 2))


#: methods whose subjects batch in a bank; DoRA's per-row weight norm does not, it runs one at a time
BANKED = ("singlora", "lora", "loraplus")


def multi_processors(unet) -> list[BankAttnProcessor]:
    return [a.processor for _, a in attention_modules(unet) if isinstance(a.processor, BankAttnProcessor)]


def add_bank(unet, n: int) -> Routing:
    """Turn the adapter on `unet` (SingLoRA, LoRA or LoRA+) into a bank of n copies of it; returns the routing.

    Only the bank trains (the staging adapter is frozen); its rows start equal to the staging adapter.
    Calling it again (a UNet that already has a bank) resizes the bank to n fresh copies.
    """
    from diffusers.models.attention_processor import XFormersAttnProcessor

    config = get_config(unet)
    if config is None or config.method not in BANKED:
        raise UserError(f"add_bank needs a {', '.join(BANKED)} adapter on the UNet (add_adapter first); "
                        f"{'DoRA' if config is not None else 'other'} subjects run one at a time")
    if n < 1:
        raise UserError(f"a bank needs at least one adapter, got {n}")
    if getattr(unet, "_dbsl_merged", False):
        raise UserError("the adapter is merged into the weights: unmerge_adapter(unet) before add_bank")
    procs = multi_processors(unet)
    ref = next(iter(procs[0].banks.values())) if procs else next(unet.parameters())
    coef = torch.full((n,), config.alpha / config.rank * getattr(unet, "_dbsl_u", 0.0), device=ref.device)
    routing = Routing(coef)
    if procs:
        for p in procs:
            p.routing = routing
            p.resize(n)
        return routing
    for _, attn in attention_modules(unet):
        if config.method == "singlora":
            proc = MultiSingLoRAAttnProcessor(attn.processor, n, routing)
        else:
            proc = MultiLoRAAttnProcessor(attn, config.target_modules, n, routing,
                                          use_xformers=isinstance(attn.processor, XFormersAttnProcessor))
        attn.set_processor(proc)
    return routing


def get_routing(unet) -> Routing:
    procs = multi_processors(unet)
    if not procs:
        raise UserError("this UNet has no adapter bank: add_adapter(unet, config) then add_bank(unet, n)")
    return procs[0].routing


def bank_parameters(unet) -> list[nn.Parameter]:
    """The bank tensors (S, *shape of the single adapter's tensor)."""
    return [b for p in multi_processors(unet) for b in p.banks.values()]


def bank_state_dict(unet) -> dict[str, torch.Tensor]:
    """{"<attention path>.<target>.A" (SingLoRA) or "...<target>.lora_A.weight" (LoRA): (S, ...)}: the
    names a single adapter's tensors have in `adapter_state_dict`."""
    return {f"{name}.{suffix}": a.processor.banks[key] for name, a in attention_modules(unet)
            if isinstance(a.processor, BankAttnProcessor) for key, (suffix, _) in a.processor.staging.items()}


@torch.no_grad()
def _bank_to_staging(unet, row: int) -> None:
    for p in multi_processors(unet):
        for key, (_, t) in p.staging.items():
            t.copy_(p.banks[key][row])


@torch.no_grad()
def _staging_to_bank(unet, row: int) -> None:
    for p in multi_processors(unet):
        for key, (_, t) in p.staging.items():
            p.banks[key][row].copy_(t)


def load_subject(unet, row: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy one saved adapter's tensors (as `read_adapter` returns them) into bank row `row`;
    every key and shape is checked as `load_adapter_state_dict` checks them."""
    load_adapter_state_dict(unet, tensors)
    _staging_to_bank(unet, row)


def save_subject(unet, row: int, output_dir, step: int, *, base_model: str | None = None) -> Path:
    """Write bank row `row` as a single-subject adapter folder (the files `save_adapter` writes,
    each atomically), recording `step` and its u."""
    _bank_to_staging(unet, row)
    set_step(unet, step)
    return save_adapter(unet, output_dir, base_model=base_model)


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


# --------------------------------------------------------------------------- rendering

def _cfg_doubles_batch(pipe, guidance_scale: float) -> bool:
    # StableDiffusionPipeline.do_classifier_free_guidance: the UNet then sees [uncond, cond]
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def generate_many(pipe, adapters: dict, cfg, output_dir, prompts: dict | None = None) -> dict:
    """Render every subject's prompts into output_dir/<subject>/<slug>/<k>.png, mixing subjects in a batch.

    pipe: a StableDiffusionPipeline without an adapter (`load_pipeline(None, base)`);
    adapters: {subject: adapter folder}; cfg: a `GenerateConfig` (steps, guidance, seed, batch_size,
    num_images_per_prompt, skip_existing, adapter_scale, compile); prompts: {subject: [prompt, ...]}
    (default: the subject's 25 DreamBooth prompts). Image k of a prompt uses seed + k, as in
    `generate_images`, so an image does not depend on which subjects share its batch.

    Adapters of one method (SingLoRA, LoRA or LoRA+), rank and targets go into one bank, batch_size
    images per batch whatever their subject (the UNet batch is twice that with guidance); each such
    group renders in turn. DoRA adapters fall back to one subject at a time, merged. With cfg.compile a
    short last batch is padded to full size (the extra images are dropped) so that one compiled graph
    serves every batch. Writes index.json and contact_sheet.png per subject; returns {"batched": [...],
    "one_at_a_time": [...], "images": n, "batch_seconds": [wall seconds of each bank batch]}.
    """
    from .prompts import get_subject

    if not adapters:
        raise UserError("no adapter to render")
    if get_config(pipe.unet) is not None:
        raise UserError("generate_many needs a pipeline without an adapter (load_pipeline(None, base_model))")
    out = Path(output_dir)
    prompts = dict(prompts or {})
    for name in adapters:
        if name not in prompts:
            prompts[name] = get_subject(name).eval_prompts(cfg.identifier)
    metas = {name: read_adapter(path)[0] for name, path in adapters.items()}
    groups: dict = {}  # (method, rank, targets) -> subjects that share one bank
    for n, m in metas.items():
        if m.get("method") in BANKED:
            groups.setdefault((m.get("method"), m.get("rank"), tuple(m.get("target_modules") or ())), []).append(n)
    batched = [n for g in groups.values() for n in g]
    alone = [n for n in adapters if n not in batched]
    n_images = 0
    for name in alone:  # one subject at a time, merged: what eval's render does
        logger.info("%s: %s adapter, rendered on its own", name, metas[name].get("method"))
        one = replace(cfg, adapter=str(adapters[name]))
        place_adapter(pipe.unet, adapters[name], adapter_scale=cfg.adapter_scale)
        try:
            n_images += len(generate_images(pipe, one, prompts[name], out / name))
        finally:
            remove_adapter(pipe.unet)
        write_index(one, prompts[name], out / name)
    seconds: list[float] = []
    for names in groups.values():
        n_images += _render_bank(pipe, {n: adapters[n] for n in names}, metas[names[0]], cfg, out, prompts, seconds)
        for n in names:
            write_index(replace(cfg, adapter=str(adapters[n])), prompts[n], out / n)
    return {"batched": batched, "one_at_a_time": alone, "images": n_images, "batch_seconds": seconds}


def _render_bank(pipe, adapters: dict, meta: dict, cfg, out: Path, prompts: dict, seconds: list) -> int:
    """Render the subjects of `adapters` (one method, rank, targets) through one bank; returns images written
    and appends each batch's wall seconds to `seconds`."""
    unet = pipe.unet
    state, coef = None, []
    for name, path in adapters.items():  # load_adapter checks each file against this UNet, then we take its tensors
        config = load_adapter(unet, path)
        try:
            own = adapter_state_dict(unet)
            state = state or {k: [] for k in own}
            for k, v in own.items():
                state[k].append(v.detach().clone())
            coef.append(config.alpha / config.rank * unet._dbsl_u * cfg.adapter_scale)
        finally:
            remove_adapter(unet)
    rows = {name: i for i, name in enumerate(adapters)}
    settings = {n: replace(cfg, adapter=str(adapters[n])).settings() for n in adapters}
    add_adapter(unet, SingLoRAConfig.from_dict(meta), use_xformers=cfg.enable_xformers_memory_efficient_attention)
    try:
        routing = add_bank(unet, len(adapters))
        for i in range(len(adapters)):
            load_subject(unet, i, {k: v[i] for k, v in state.items()})
        routing.set_coef(torch.tensor(coef, device=routing.coef.device))
        for p in dict.fromkeys(q for n in adapters for q in prompts[n]):
            check_prompt_length(pipe.tokenizer, p)
        jobs = [(n, p, s, k) for n in adapters for p, s, k in plan(prompts[n], cfg.num_images_per_prompt)]
        if cfg.skip_existing:
            jobs = [j for j in jobs if not (out / j[0] / j[2] / f"{j[3]}.png").is_file()]
        doubled = _cfg_doubles_batch(pipe, cfg.guidance_scale)
        device = unet.device
        with compiled(pipe, cfg.compile), PngWriter() as writer:
            for batch, n_real in tqdm(batches(jobs, cfg.batch_size, pad=cfg.compile), unit="batch",
                                      desc=f"generating ({meta.get('method')}, mixed subjects)"):
                t0 = time.perf_counter()
                index = torch.tensor([rows[n] for n, _, _, _ in batch], device=device)
                routing.route(torch.cat([index, index]) if doubled else index)
                try:
                    images = sample(pipe, cfg, [p for _, p, _, _ in batch], [k for _, _, _, k in batch])
                except torch.cuda.OutOfMemoryError:
                    raise UserError(f"out of GPU memory rendering {len(batch)} images per batch "
                                    f"({len(batch) * (2 if doubled else 1)} UNet samples): lower --batch_size; "
                                    f"the images written so far are kept (run again to go on)") from None
                for (n, p, s, k), img in zip(batch[:n_real], images):
                    writer.write(img, out / n / s / f"{k}.png", p, cfg.seed + k, settings[n])
                seconds.append(round(time.perf_counter() - t0, 3))
    finally:
        remove_adapter(unet)
    return len(jobs)


# --------------------------------------------------------------------------- CLI

def find_subject_adapters(root, names) -> dict[str, Path]:
    """{subject: <root>/<subject>} for the subjects asked for ('all': every DreamBooth subject)."""
    from .prompts import get_subject, subjects

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"adapters folder {root} does not exist (expected <adapters>/<subject>/{WEIGHTS_NAME})")
    wanted = list(subjects()) if list(names) == ["all"] else list(names)
    for n in wanted:
        get_subject(n)
    missing = [n for n in wanted if not (root / n / WEIGHTS_NAME).is_file()]
    if missing:
        raise UserError(f"no adapter for {len(missing)} subject(s) in {root}: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} (expected <adapters>/<subject>/{WEIGHTS_NAME}; "
                        "list the subjects you have with --subjects)")
    return {n: root / n for n in wanted}


def build_parser() -> argparse.ArgumentParser:
    from .config import add_arguments
    from .generate import GenerateConfig

    p = argparse.ArgumentParser(prog="dreambooth-singlora generate-many", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", required=True, help="folder of per-subject adapter folders (<adapters>/<subject>/)")
    p.add_argument("--subjects", nargs="+", default=["all"], help="subjects to render, or 'all' (default)")
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts of each subject")
    p.add_argument("--no_resume", action="store_true", help="re-render images already in --output_dir")
    # every generation flag of `generate`, same names and defaults (GenerateConfig); --output_dir required here
    add_arguments(p, GenerateConfig, exclude=("adapter", "prompt", "prompts_file", "subject", "skip_existing", "merge"))
    p.set_defaults(output_dir=None)
    return p


@cli_entry
def main(argv=None):
    from .config import from_args
    from .generate import GenerateConfig, check_writable, load_pipeline
    from .prompts import get_subject

    args = build_parser().parse_args(argv)
    if not args.output_dir:
        raise UserError("--output_dir is required (the images folder: <output_dir>/<subject>/<slug>/<k>.png)")
    adapters = find_subject_adapters(args.adapters, args.subjects)
    args.adapter, args.skip_existing, args.merge = str(next(iter(adapters.values()))), not args.no_resume, False
    cfg = from_args(GenerateConfig, args)
    check_writable(args.output_dir)
    base = args.pretrained_model_name_or_path or read_adapter(cfg.adapter)[0].get("base_model")
    pipe = load_pipeline(None, base, dtype=args.dtype, scheduler=args.scheduler,
                         use_xformers=args.enable_xformers_memory_efficient_attention)
    if args.max_prompts is not None and args.max_prompts < 1:
        raise UserError(f"--max_prompts must be >= 1, got {args.max_prompts}")
    prompts = {n: get_subject(n).eval_prompts(args.identifier)[:args.max_prompts] for n in adapters}
    result = generate_many(pipe, adapters, cfg, args.output_dir, prompts)
    print(f"{result['images']} images for {len(adapters)} subjects in {args.output_dir} "
          f"({len(result['batched'])} batched, {len(result['one_at_a_time'])} one at a time)")


if __name__ == "__main__":
    main()
