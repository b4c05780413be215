"""Generate images from saved adapters: one renderer for one adapter, or many subjects mixed in a batch.

    python -m dreambooth_singlora.generate --adapter runs/dog/adapter --prompt "a sks dog on the beach"
    python -m dreambooth_singlora.generate --adapter runs/dog/adapter --subject dog   # the 25 DreamBooth prompts
    dreambooth-singlora generate-many --adapters runs/all --subjects all --output_dir runs/all/images

The adapter's config names its base model (override with --pretrained_model_name_or_path), of any family the
trainer knows (SD 1.x, 2.x, XL; an adapter of one family on another's base is refused). One
adapter is merged into the UNet weights by default, so sampling costs what the base model costs.
Many subjects' SingLoRA, LoRA or LoRA+ adapters go into one adapter bank and every batch mixes
subjects (each sample routed through its own adapter); DoRA adapters render one at a time, merged.
Image k of a prompt uses seed + k, whatever the batch size or the subjects beside it: same seed and
settings, same images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .adapter import (WEIGHTS_NAME, adapter_family, adapter_state, adapter_state_dict, add_adapter, get_config,
                      load_adapter, load_adapter_state_dict, merge_adapter, read_adapter, remove_adapter, set_strength)
from .bank import BANKED, add_bank, staging_to_row
from .base import Base, detect_family, torch_dtype
from .config import GenerateConfig, from_args, generate_many_parser, generate_parser, many_config
from .data import image_grid, use_cpu_threads
from .errors import UserError, cli_entry
from .events import Bar, Events, job
from .fileio import atomic_path, check_writable, write_json_atomic
from .prompts import get_subject, resolve_subjects, slugify

logger = logging.getLogger("dreambooth_singlora.generate")


def load_pipeline(adapter=None, base_model=None, *, device=None, dtype=None, merge: bool = True,
                  scheduler: str | None = None, adapter_scale: float = 1.0, use_xformers: bool = False,
                  base_config: str | None = None):
    """The base model's pipeline (its family's: SD 1.x / 2.x or SDXL) with the adapter at `adapter` on its UNet
    (base model: the adapter's by default, with its --base_config if it was a single file; `base_config` for a
    single-file `base_model`); UserError for a missing or corrupt adapter, a base model it cannot load, or an
    adapter of another family or architecture."""
    from accelerate import PartialState

    meta = read_adapter(adapter)[0] if adapter else {}
    src = base_model or meta.get("base_model")
    base_config = base_config or (None if base_model else (meta.get("run") or {}).get("base_config"))
    if not src:
        raise UserError(f"adapter {adapter} records no base model: give --pretrained_model_name_or_path")
    device = torch.device(device) if device else PartialState().device
    use_cpu_threads(device)
    trained_on, family = adapter_family(meta), detect_family(src, base_config=base_config)  # before any weights
    if adapter and trained_on != family.name:
        raise UserError(f"adapter {adapter} was trained on a {trained_on} base ({meta.get('base_model')}), but "
                        f"{src} is {family.name} ({family.label}): give a {trained_on} base with "
                        "--pretrained_model_name_or_path")
    base = Base.load(src, dtype=torch_dtype(dtype, device), device=device, base_config=base_config, family=family)
    pipe = base.pipeline(scheduler=scheduler)
    if adapter:
        place_adapter(pipe.unet, adapter, adapter_scale=adapter_scale, merge=merge, use_xformers=use_xformers)
    elif use_xformers:
        pipe.enable_xformers_memory_efficient_attention()
    return pipe


def place_adapter(unet, adapter, *, adapter_scale: float = 1.0, merge: bool = True, use_xformers: bool = False) -> None:
    load_adapter(unet, adapter, use_xformers=use_xformers)
    if adapter_scale != 1.0:
        set_strength(unet, adapter_scale)
    if merge:
        merge_adapter(unet)


def plan(prompts: list[str], n: int) -> list[tuple[str, str, int]]:
    """(prompt, slug, k) for every image; slugs made unique per prompt (never a path from prompt text)."""
    used: set[str] = set()
    out = []
    for p in prompts:
        base = s = slugify(p)
        i = 1
        while s in used:  # "x", "x", "x 2" -> x, x-2, x-2-2: never two prompts in one folder
            i += 1
            s = f"{base}-{i}"
        used.add(s)
        out += [(p, s, k) for k in range(n)]
    return out


def parameters_text(prompt: str, seed: int, settings: dict, size) -> str:
    """The A1111-style `parameters` text that ComfyUI, A1111 and image viewers show:
    '<prompt>\\nSteps: 50, Sampler: ddim, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: ..., Lora: ...'."""
    fields = {"Steps": settings.get("num_inference_steps"), "Sampler": settings.get("scheduler"),
              "CFG scale": settings.get("guidance_scale"), "Seed": seed, "Size": f"{size[0]}x{size[1]}",
              "Model": settings.get("pretrained_model_name_or_path"), "Lora": settings.get("adapter"),
              "Lora strength": settings.get("adapter_scale") if settings.get("adapter") else None}
    return prompt + "\n" + ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)


def write_png(img, path: Path, prompt: str, seed: int, settings: dict) -> None:
    info = PngImagePlugin.PngInfo()
    for key, text in (("prompt", prompt), ("seed", str(seed)), ("settings", json.dumps(settings)),
                      ("parameters", parameters_text(prompt, seed, settings, img.size))):
        info.add_text(key, text)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


class PngWriter:
    """Write PNGs on worker threads while the GPU renders the next batch (PNG encoding of a 512 px image takes
    ~60 ms of CPU: one at a time it would hold the GPU up). At most `max_pending` writes wait. A failed write (a
    full disk, ...) is raised by the next `write` that finds it done, or on leaving the `with` block, which waits
    for every write; if the block itself raised, that error wins and failed writes are only logged. Give each
    write its own image object (PIL keeps a save's options on the image while it saves)."""

    def __init__(self, workers: int | None = None, max_pending: int = 64):
        self.pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1), thread_name_prefix="png")
        self.pending: list[Future] = []
        self.max_pending = max_pending

    def write(self, img, path: Path, prompt: str, seed: int, settings: dict) -> None:
        self.pending.append(self.pool.submit(write_png, img, path, prompt, seed, settings))
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0].done()):
            self.pending.pop(0).result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.pool.shutdown(wait=True)
        for f in self.pending:
            if exc_type is None:
                f.result()
            elif f.exception() is not None:  # keep the block's own error (e.g. out of memory)
                logger.error("writing a PNG failed too: %s", f.exception())


#: keyword arguments of torch.compile for --compile (e.g. {"mode": "max-autotune-no-cudagraphs"})
COMPILE_OPTIONS: dict = {}


@contextmanager
def compiled(pipe, enabled: bool = True):
    """torch.compile the pipeline's UNet and VAE decoder in place for the `with` block (no-op if not enabled).

    The first batch pays the compile (one to two minutes for SD1.5 on an H100); changing the UNet's
    adapters or batch shape compiles again. On exit the modules run eagerly again."""
    mods = [pipe.unet, pipe.vae.decoder] if enabled else []
    for m in mods:
        m.compile(**COMPILE_OPTIONS)
    try:
        yield pipe
    finally:
        for m in mods:
            m._compiled_call_impl = None


def batches(jobs: list, size: int, pad: bool = False) -> list[tuple[list, int]]:
    """[(batch, n)] for consecutive batches of `size` jobs; n = how many are real. pad=True fills a short last
    batch (after full ones) with copies of its last job, whose images the caller drops: every batch then has
    one shape, so a compiled UNet is not compiled again for the last one."""
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    pad = pad and len(chunks) > 1
    return [(b + b[-1:] * (size - len(b) if pad else 0), len(b)) for b in chunks]


class Job(NamedTuple):
    """One image to render: `prompt` with `seed` into `path`, through bank row `row` (None: the pipeline's own
    UNet), recording `settings`."""
    prompt: str
    seed: int
    path: Path
    settings: dict
    row: Optional[int] = None


def rendered(job: Job) -> bool:
    """Whether job.path already holds this job's image: a complete PNG whose recorded prompt, seed and settings
    (the adapter's weights digest among them) are the job's. Another run's image there is rendered again."""
    try:
        with Image.open(job.path) as im:
            return im.text.get("prompt") == job.prompt and im.text.get("settings") == json.dumps(job.settings)
    except Exception:  # noqa: BLE001 - missing, truncated or not a PNG: render it
        return False


def render(pipe, cfg: GenerateConfig, jobs: list[Job], routing=None, events=None, desc: str = "generating",
           show: bool | None = None) -> list[float]:
    """The one renderer (generate, generate-many, eval render, the trainer's class and validation images): every
    job's image (those already `rendered` skipped with cfg.skip_existing), cfg.batch_size a batch, routed per sample
    through a bank when `routing` is given; `progress` events to `events`. Returns each batch's wall seconds."""
    tok = pipe.tokenizer
    for p in dict.fromkeys(j.prompt for j in jobs):  # warn of a prompt over the text encoder's 77 tokens
        ids, limit = tok(p, truncation=False).input_ids, tok.model_max_length
        if len(ids) > limit:
            logger.warning("prompt is %d tokens, over the %d-token limit: it is cut after %r; dropped: %r",
                           len(ids), limit, tok.decode(ids[1:limit - 1])[-40:], tok.decode(ids[limit - 1:-1]))
    if cfg.skip_existing:
        jobs = [j for j in jobs if not rendered(j)]
    # the pipeline's do_classifier_free_guidance: the UNet then sees [uncond, cond]
    doubled = cfg.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    seconds = []
    if show is None:  # one bar per run, not per process
        from accelerate import PartialState

        show = PartialState().is_main_process
    done, bar = 0, tqdm(total=len(jobs), desc=desc, unit="image", disable=not show)
    forward = [] if events is None else [lambda e: events.emit("progress", done=e["done"], total=e["total"],
                                                                unit=e["unit"])]
    progress = Events(desc, [Bar(bar), *forward])  # the bar and the caller's stream, consumers of one event
    with compiled(pipe, cfg.compile), PngWriter() as writer:
        for batch, n in batches(jobs, cfg.batch_size, pad=cfg.compile):
            t0 = time.perf_counter()
            if routing is not None:
                index = torch.tensor([j.row for j in batch], device=pipe.unet.device)
                routing.route(torch.cat([index, index]) if doubled else index)
            gens = [torch.Generator(pipe.unet.device).manual_seed(j.seed) for j in batch]
            try:
                images = pipe([j.prompt for j in batch], generator=gens, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width).images
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"out of GPU memory rendering {len(batch)} images per batch: lower --batch_size; "
                                "the images written so far are kept (run again to go on)") from None
            for j, img in zip(batch[:n], images):
                writer.write(img, j.path, j.prompt, j.seed, j.settings)
            seconds.append(round(time.perf_counter() - t0, 3))
            done += n
            progress.emit("progress", done=done, total=len(jobs), unit="image")
    bar.close()
    return seconds


def index_records(cfg: GenerateConfig, prompts: list[str]) -> list[dict]:
    """index.json's record of every image of `prompts`, in `plan` order."""
    return [{"prompt": p, "slug": s, "k": k, "seed": cfg.seed + k, "file": f"{s}/{k}.png"}
            for p, s, k in plan(prompts, cfg.num_images_per_prompt)]


def generate_images(pipe, cfg: GenerateConfig, prompts: list[str] | None = None, output_dir=None,
                    events=None) -> list[dict]:
    """Render `prompts` (default: cfg's) with the pipeline as it is into output_dir/<slug>/<k>.png (text chunks:
    prompt, seed, settings). Returns one record per image."""
    records = index_records(cfg, prompts if prompts is not None else cfg.prompts())
    out, settings = Path(output_dir or cfg.output_dir), cfg.settings()
    render(pipe, cfg, [Job(r["prompt"], r["seed"], out / r["file"], settings) for r in records], events=events)
    return records


def generate_many(pipe, adapters: dict, cfg: GenerateConfig, output_dir, prompts: dict | None = None,
                  events=None) -> dict:
    """Render every subject's prompts into output_dir/<subject>/<slug>/<k>.png, subjects mixed in each batch.

    pipe: a pipeline without an adapter (`load_pipeline(None, base)`); adapters: {subject: adapter folder};
    prompts: {subject: [prompt, ...]} (default: the subject's 25 DreamBooth prompts). Adapters of one
    method (SingLoRA, LoRA or LoRA+), rank and targets share one bank, rendered in turn; DoRA adapters
    render one subject at a time, merged. Writes index.json and contact_sheet.png per subject; returns
    {"batched": [...], "one_at_a_time": [...], "images": n, "batch_seconds": [...]}."""
    if not adapters:
        raise UserError("no adapter to render")
    if get_config(pipe.unet) is not None:
        raise UserError("generate_many needs a pipeline without an adapter (load_pipeline(None, base_model))")
    out = Path(output_dir)
    prompts = {n: prompts[n] if prompts and n in prompts else get_subject(n).eval_prompts(cfg.identifier)
               for n in adapters}
    cfgs = {n: replace(cfg, adapter=str(path)) for n, path in adapters.items()}
    groups: dict = {}  # (method, rank, targets) -> subjects that share one bank; None -> one at a time
    for n, path in adapters.items():
        m = read_adapter(path)[0]
        key = (m["method"], m.get("rank"), tuple(m.get("target_modules") or ())) if m.get("method") in BANKED else None
        groups.setdefault(key, []).append(n)
    seconds = []
    for key, names in groups.items():
        for group in ([names] if key is not None else [[n] for n in names]):
            jobs = [Job(r["prompt"], r["seed"], out / n / r["file"], cfgs[n].settings(), row)
                    for row, n in enumerate(group) for r in index_records(cfg, prompts[n])]
            with placed(pipe.unet, [adapters[n] for n in group], cfg, bank=key is not None) as routing:
                seconds += render(pipe, cfg, jobs, routing, events=events)
    for n in adapters:
        write_index(cfgs[n], prompts[n], out / n)
    batched = [n for key, names in groups.items() if key is not None for n in names]
    return {"batched": batched, "one_at_a_time": [n for n in adapters if n not in batched],
            "images": sum(map(len, prompts.values())) * cfg.num_images_per_prompt, "batch_seconds": seconds}


@contextmanager
def placed(unet, paths: list, cfg: GenerateConfig, bank: bool):
    """For the `with` block, the adapter at paths[0] merged on `unet` (yields None), or with `bank` the
    adapters at `paths` in one bank, row i = paths[i] (yields the bank's routing); the UNet is bare again
    afterwards."""
    xformers = cfg.enable_xformers_memory_efficient_attention
    if not bank:
        place_adapter(unet, paths[0], adapter_scale=cfg.adapter_scale, use_xformers=xformers)
        try:
            yield None
        finally:
            remove_adapter(unet)
        return
    loaded = []  # (config, tensors, coef) of each adapter, checked against this UNet by load_adapter
    for path in paths:
        config = load_adapter(unet, path)
        try:
            state = adapter_state(unet)
            loaded.append((config, {k: v.detach().clone() for k, v in adapter_state_dict(unet).items()},
                           config.coef(state.step, cfg.adapter_scale)))
        finally:
            remove_adapter(unet)
    add_adapter(unet, loaded[0][0], use_xformers=xformers)
    try:
        routing = add_bank(unet, len(paths))
        for i, (_, tensors, _) in enumerate(loaded):
            load_adapter_state_dict(unet, tensors)
            staging_to_row(unet, i)
        routing.set_coef(torch.tensor([coef for _, _, coef in loaded], device=routing.coef.device))
        yield routing
    finally:
        remove_adapter(unet)


def write_index(cfg: GenerateConfig, prompts: list[str], output_dir=None) -> Path:
    """index.json (every image with prompt and seed, plus the settings) and contact_sheet.png."""
    out = Path(output_dir or cfg.output_dir)
    images = index_records(cfg, prompts)
    write_json_atomic(out / "index.json", {"settings": cfg.settings(), "images": images})
    thumbs = []
    for rec in images:
        with Image.open(out / rec["file"]) as im:
            im.thumbnail((192, 192))
            if max(im.size) < 128:  # tiny images: blown up so that the captions fit
                im = im.resize(tuple(128 * side // max(im.size) for side in im.size), Image.Resampling.NEAREST)
            thumbs.append(im.convert("RGB"))
    sheet = image_grid(thumbs, cols=cfg.num_images_per_prompt, captions=[f"seed {r['seed']}" for r in images],
                       row_titles=[r["prompt"] for r in images[::cfg.num_images_per_prompt]],  # a row per prompt given
                       title=f"{cfg.adapter or cfg.pretrained_model_name_or_path}: {cfg.num_inference_steps} steps, "
                             f"guidance {cfg.guidance_scale:g}, {cfg.scheduler}")
    with atomic_path(out / "contact_sheet.png") as tmp:
        sheet.save(tmp, format="PNG")
    return out


def render_subjects(adapters_dir, output_dir, cfg: GenerateConfig, names=None, max_prompts: int | None = None,
                    skip_missing: bool = False, events=None) -> dict:
    """Every subject's prompts (the first max_prompts of its 25) from <adapters_dir>/<subject>/ into
    output_dir/<subject>/, subjects split over the processes accelerate launched and mixed in each batch.
    A subject without an adapter is an error, or with skip_missing a warning; returns
    {"rendered": [...], "skipped": [...], "images": n}."""
    from accelerate import PartialState

    if max_prompts is not None and max_prompts < 1:
        raise UserError(f"--max_prompts must be >= 1, got {max_prompts}")
    root = Path(adapters_dir)
    if not root.is_dir():
        raise UserError(f"adapters folder {root} does not exist (expected <adapters>/<subject>/{WEIGHTS_NAME})")
    found, problems = {}, []
    for name in resolve_subjects(names):
        if (root / name / WEIGHTS_NAME).is_file():
            found[name] = root / name
        else:
            problems.append(f"{name}: no adapter at {root / name / WEIGHTS_NAME}")
    if problems and not (skip_missing and found):
        raise UserError(f"no adapter for {len(problems)} subject(s): {'; '.join(problems[:3])}"
                        f"{' ...' if len(problems) > 3 else ''} (list the subjects you have with --subjects)")
    for p in problems:
        logger.warning("skipping %s", p)
    check_writable(output_dir)
    state = PartialState()
    base = cfg.pretrained_model_name_or_path or read_adapter(next(iter(found.values())))[0].get("base_model")
    pipe = load_pipeline(None, base, device=state.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                         use_xformers=cfg.enable_xformers_memory_efficient_attention, base_config=cfg.base_config)
    result = {"images": 0}
    with state.split_between_processes(sorted(found)) as mine:
        if mine:
            result = generate_many(pipe, {n: found[n] for n in mine}, cfg, output_dir,
                                   {n: get_subject(n).eval_prompts(cfg.identifier)[:max_prompts] for n in mine},
                                   events=events)
    state.wait_for_everyone()
    return {"rendered": list(mine), "skipped": problems, "images": result["images"]}


@cli_entry
def main_many(argv=None):
    """`dreambooth-singlora generate-many`: many subjects' adapters, subjects mixed in each batch."""
    args = generate_many_parser().parse_args(argv)
    cfg = many_config(args)
    with job("generate-many", cfg.events) as events:
        result = render_subjects(args.adapters, args.output_dir, cfg, args.subjects, args.max_prompts, events=events)
        events.emit("finished", outputs=[str(Path(args.output_dir) / n) for n in result["rendered"]])
    print(f"{result['images']} images for {len(result['rendered'])} subjects in {args.output_dir}")


@cli_entry
def main(argv=None):
    cfg = from_args(GenerateConfig, generate_parser().parse_args(argv))
    with job("generate", cfg.events) as events:
        prompts = cfg.prompts()
        check_writable(cfg.output_dir)
        events.emit("started", config=asdict(cfg))
        pipe = load_pipeline(cfg.adapter, cfg.pretrained_model_name_or_path, dtype=cfg.dtype, merge=cfg.merge,
                             scheduler=cfg.scheduler, adapter_scale=cfg.adapter_scale,
                             use_xformers=cfg.enable_xformers_memory_efficient_attention, base_config=cfg.base_config)
        records = generate_images(pipe, cfg, prompts, events=events)
        out = write_index(cfg, prompts)
        events.emit("finished", outputs=[str(out / r["file"]) for r in records] + [str(out / "index.json"),
                                                                                  str(out / "contact_sheet.png")])
    print(f"{len(prompts) * cfg.num_images_per_prompt} images in {out} (index.json, contact_sheet.png)")


if __name__ == "__main__":
    main()
