"""Many subjects on one frozen UNet: a bank of S SingLoRA adapters per adapted projection.

Each adapted projection holds A of shape (S, D, r), one row per subject. Before a UNet call,
`Routing.route(index)` says which adapter each sample of the batch uses (index: (B,) subject
rows); every processor then gathers A[index] (B, D, r) and applies it with two batched
matmuls (`singlora_matmul`'s 3-D path). No per-subject Python loop runs inside the UNet.

    add_adapter(unet, config)            # the single-subject adapter: its A is every row's start
    routing = add_bank(unet, n)          # -> a bank of n copies
    routing.route(torch.tensor([0, 0, 1, 2]))
    unet(latents, t, emb)                # samples 0, 1 through adapter 0, sample 2 through 1, ...

The single-subject adapter stays on each processor as a staging slot: `save_subject` copies a
row into it and calls `save_adapter`, `load_subject` reads a saved adapter through it, so files
are exactly those of a single-subject run. With no index routed the processors behave exactly
as `SingLoRAAttnProcessor` (the staging adapter alone).

`generate_many` renders many subjects' prompts in mixed batches this way (classifier-free
guidance batched too); `python -m dreambooth_singlora.multi` is its command line.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapter import (WEIGHTS_NAME, add_adapter, adapter_state_dict, attention_modules, get_config, load_adapter,
                      load_adapter_state_dict, merge_adapter, read_adapter, remove_adapter, save_adapter, set_step)
from .config import SingLoRAConfig
from .errors import UserError, cli_entry
from .fileio import atomic_path
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
        self._per_sample = {}

    def set_coef(self, coef) -> None:
        """Set every row's (alpha / r) * u: a float (all rows) or a (S,) tensor."""
        if torch.is_tensor(coef):
            self.coef.copy_(coef)
        else:
            self.coef.fill_(coef)
        self._per_sample = {}

    def sample_coef(self, dtype: torch.dtype) -> torch.Tensor:  # -> (B, 1, 1), computed once per route/dtype
        c = self._per_sample.get(dtype)
        if c is None:
            c = self._per_sample[dtype] = self.coef[self.index].to(dtype).view(-1, 1, 1)
        return c


class MultiSingLoRAAttnProcessor(SingLoRAAttnProcessor):
    """`SingLoRAAttnProcessor` with a bank of adapters per adapted projection, routed per sample."""

    def __init__(self, single: SingLoRAAttnProcessor, n: int, routing: Routing):
        nn.Module.__init__(self)  # take over `single`'s adapters as the staging slot: no new A, no RNG drawn
        self.targets, self.adapters = single.targets, single.adapters
        self.merged, self.use_xformers = single.merged, single.use_xformers
        self.routing = routing  # a plain object, shared: not a submodule
        self.banks = nn.ParameterDict()
        self.resize(n)

    def resize(self, n: int) -> None:
        """A bank of n rows, each a copy of the staging adapter's A (fp32, trainable)."""
        for key, layer in self.adapters.items():
            layer.A.requires_grad_(False)
            self.banks[key] = nn.Parameter(layer.A.detach()[None].repeat(n, 1, 1))  # (n, D, r)

    def project(self, layer: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
        index = self.routing.index
        if index is None:
            return super().project(layer, target, x)
        key = _key(target)
        if key not in self.adapters:
            return layer(x)
        if self.merged:
            raise UserError("the staging adapter is merged into the weights: unmerge_adapter(unet) before "
                            "routing samples through the adapter bank")
        if index.shape[0] != x.shape[0]:
            raise UserError(f"routing index has {index.shape[0]} entries for a batch of {x.shape[0]} samples: "
                            "route one adapter row per sample (with classifier-free guidance, repeat the index "
                            "for the unconditional half)")
        a = self.adapters[key]
        dtype = compute_dtype(x)
        A = self.banks[key][index].to(dtype)  # (B, D, r): sample b's own adapter
        return layer(x) + singlora_matmul(x, A, a.d_in, a.d_out, self.routing.sample_coef(dtype))


def multi_processors(unet) -> list[MultiSingLoRAAttnProcessor]:
    return [a.processor for _, a in attention_modules(unet) if isinstance(a.processor, MultiSingLoRAAttnProcessor)]


def add_bank(unet, n: int) -> Routing:
    """Turn the SingLoRA adapter on `unet` into a bank of n copies of it; returns the routing.

    Only the bank trains (the staging adapter is frozen); its rows start equal to the staging A.
    Calling it again (a UNet that already has a bank) resizes the bank to n fresh copies.
    """
    config = get_config(unet)
    if config is None or config.method != "singlora":
        raise UserError("add_bank needs a SingLoRA adapter on the UNet (add_adapter with method 'singlora'); "
                        "LoRA / LoRA+ / DoRA subjects run one at a time")
    if n < 1:
        raise UserError(f"a bank needs at least one adapter, got {n}")
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
        attn.set_processor(MultiSingLoRAAttnProcessor(attn.processor, n, routing))
    return routing


def get_routing(unet) -> Routing:
    procs = multi_processors(unet)
    if not procs:
        raise UserError("this UNet has no adapter bank: add_adapter(unet, config) then add_bank(unet, n)")
    return procs[0].routing


def bank_parameters(unet) -> list[nn.Parameter]:
    """The bank tensors (S, D, r), in the order of `adapter_state_dict`'s keys."""
    return [p.banks[_key(t)] for p in multi_processors(unet) for t in p.targets]


def bank_state_dict(unet) -> dict[str, torch.Tensor]:
    """{"<attention path>.<target>.A": (S, D, r)}: the names a single adapter's tensors have."""
    return {f"{name}.{t}.A": a.processor.banks[_key(t)] for name, a in attention_modules(unet)
            if isinstance(a.processor, MultiSingLoRAAttnProcessor) for t in a.processor.targets}


@torch.no_grad()
def _bank_to_staging(unet, row: int) -> None:
    for p in multi_processors(unet):
        for key, layer in p.adapters.items():
            layer.A.copy_(p.banks[key][row])


@torch.no_grad()
def _staging_to_bank(unet, row: int) -> None:
    for p in multi_processors(unet):
        for key, layer in p.adapters.items():
            p.banks[key][row].copy_(layer.A)


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
    num_images_per_prompt, skip_existing, adapter_scale); prompts: {subject: [prompt, ...]}
    (default: the subject's 25 DreamBooth prompts). Image k of a prompt uses seed + k, as in
    `generate_images`, so an image does not depend on which subjects share its batch.

    SingLoRA adapters of one rank and targets go into one bank, batch_size images per batch whatever
    their subject (the UNet batch is twice that with guidance). Other adapters (LoRA, LoRA+, DoRA, or
    SingLoRA of another rank) fall back to one subject at a time, merged. Writes index.json and
    contact_sheet.png per subject; returns {"batched": [...], "one_at_a_time": [...], "images": n}.
    """
    from .generate import check_prompt_length, generate_images, plan, write_index, write_png
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
    first = next((n for n in adapters if metas[n].get("method") == "singlora"), None)
    key = lambda m: (m.get("method"), m.get("rank"), list(m.get("target_modules") or []))  # noqa: E731
    batched = [n for n in adapters if first is not None and key(metas[n]) == key(metas[first])]
    alone = [n for n in adapters if n not in batched]
    settings = {n: replace(cfg, adapter=str(adapters[n])).settings() for n in adapters}
    unet, n_images = pipe.unet, 0

    for name in alone:  # one subject at a time, merged: what eval's render does
        logger.info("%s: %s adapter, rendered on its own", name, metas[name].get("method"))
        load_adapter(unet, adapters[name])
        merge_adapter(unet)
        try:
            n_images += len(generate_images(pipe, replace(cfg, adapter=str(adapters[name])), prompts[name],
                                            out / name))
        finally:
            remove_adapter(unet)
        write_index(replace(cfg, adapter=str(adapters[name])), prompts[name], out / name)

    if batched:
        rows, coef, state = {}, [], None
        for name in batched:  # load_adapter checks each file against this UNet, then we take its tensors
            config = load_adapter(unet, adapters[name])
            try:
                if state is None:
                    state = {k: [] for k in adapter_state_dict(unet)}
                for k, v in adapter_state_dict(unet).items():
                    state[k].append(v.detach().clone())
                coef.append(config.alpha / config.rank * unet._dbsl_u * cfg.adapter_scale)
            finally:
                remove_adapter(unet)
            rows[name] = len(rows)
        add_adapter(unet, SingLoRAConfig.from_dict(metas[batched[0]]),
                    use_xformers=cfg.enable_xformers_memory_efficient_attention)
        try:
            routing = add_bank(unet, len(batched))
            for i in range(len(batched)):
                load_subject(unet, i, {k: v[i] for k, v in state.items()})
            routing.set_coef(torch.tensor(coef, device=routing.coef.device))
            for p in dict.fromkeys(q for n in batched for q in prompts[n]):
                check_prompt_length(pipe.tokenizer, p)
            jobs = [(n, p, s, k) for n in batched for p, s, k in plan(prompts[n], cfg.num_images_per_prompt)]
            if cfg.skip_existing:
                jobs = [j for j in jobs if not (out / j[0] / j[2] / f"{j[3]}.png").is_file()]
            doubled = _cfg_doubles_batch(pipe, cfg.guidance_scale)
            device = unet.device
            for i in tqdm(range(0, len(jobs), cfg.batch_size), desc="generating (mixed subjects)", unit="batch"):
                batch = jobs[i:i + cfg.batch_size]
                index = torch.tensor([rows[n] for n, _, _, _ in batch], device=device)
                routing.route(torch.cat([index, index]) if doubled else index)
                gens = [torch.Generator(device).manual_seed(cfg.seed + k) for _, _, _, k in batch]
                try:
                    images = pipe([p for _, p, _, _ in batch], generator=gens,
                                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                  height=cfg.height, width=cfg.width).images
                except torch.cuda.OutOfMemoryError:
                    raise UserError(f"out of GPU memory rendering {len(batch)} images per batch "
                                    f"({len(batch) * (2 if doubled else 1)} UNet samples): lower --batch_size; "
                                    f"the images written so far are kept (run again to go on)") from None
                for (n, p, s, k), img in zip(batch, images):
                    write_png(img, out / n / s / f"{k}.png", p, cfg.seed + k, settings[n])
                n_images += len(batch)
        finally:
            remove_adapter(unet)
        for n in batched:
            write_index(replace(cfg, adapter=str(adapters[n])), prompts[n], out / n)
    return {"batched": batched, "one_at_a_time": alone, "images": n_images}


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
