"""Generate images from a saved adapter.

    python -m dreambooth_singlora.generate --adapter out/dog --prompt "a sks dog on the beach"
    python -m dreambooth_singlora.generate --adapter out/dog --subject dog     # the 25 DreamBooth prompts

The adapter's config names its base model (override with --pretrained_model_name_or_path). By
default the adapter is merged into the UNet weights, so sampling costs what the base model costs.
Each image's k uses seed + k, whatever the batch size: same seed and settings, same images.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from PIL import PngImagePlugin
from tqdm.auto import tqdm

from .adapter import get_config, load_adapter, merge_adapter, read_adapter, singlora_layers
from .config import _help, dataclass_parser, from_args
from .data import image_grid
from .errors import UserError, cli_entry
from .fileio import atomic_path, write_json_atomic
from .prompts import IDENTIFIER, get_subject, slugify

logger = logging.getLogger("dreambooth_singlora.generate")

SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler", "ddpm": "DDPMScheduler",
}


@dataclass
class GenerateConfig:
    """What to render, from which adapter, how. Shared by the CLI and `generate_images`."""

    adapter: Optional[str] = field(default=None, metadata=_help("adapter folder (adapter_model.safetensors + "
                                                                "adapter_config.json); none = the base model alone"))
    pretrained_model_name_or_path: Optional[str] = field(default=None, metadata=_help(
        "base model (default: the one named in the adapter's config)"))
    prompt: List[str] = field(default_factory=list, metadata=_help("a prompt (repeat the flag for more)", action="append"))
    prompts_file: Optional[str] = field(default=None, metadata=_help("a text file, one prompt per line"))
    subject: Optional[str] = field(default=None, metadata=_help("the 25 DreamBooth prompts of this subject"))
    identifier: str = field(default=IDENTIFIER, metadata=_help("the subject's identifier token, for --subject"))
    num_images_per_prompt: int = field(default=4, metadata=_help("images per prompt"))
    seed: int = field(default=0, metadata=_help("image k of every prompt uses seed + k"))
    num_inference_steps: int = field(default=50, metadata=_help("denoising steps"))
    guidance_scale: float = field(default=7.5, metadata=_help("classifier-free guidance scale"))
    scheduler: str = field(default="ddim", metadata=_help("sampler", choices=tuple(SCHEDULERS)))
    batch_size: int = field(default=4, metadata=_help("images per UNet batch (does not change the images)"))
    adapter_scale: float = field(default=1.0, metadata=_help("strength of the adapter (1 = as trained)"))
    merge: bool = field(default=True, metadata=_help("merge the adapter into the weights (same images, faster)"))
    height: Optional[int] = field(default=None, metadata=_help("image height (default: the model's)"))
    width: Optional[int] = field(default=None, metadata=_help("image width (default: the model's)"))
    dtype: Optional[str] = field(default=None, metadata=_help(
        "fp32, fp16 or bf16 (default: fp16 on a GPU, fp32 on the CPU)", choices=("fp32", "fp16", "bf16")))
    output_dir: str = field(default="outputs/samples", metadata=_help("where the PNGs, index.json and sheet go"))
    skip_existing: bool = field(default=False, metadata=_help("keep images already in output_dir (resume)"))
    enable_xformers_memory_efficient_attention: bool = field(default=False, metadata=_help("xformers attention"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the UNet and the VAE decoder: one to two minutes to compile, then faster sampling "
        "(H100: UNet 1.4x, VAE decode 2.2x); worth it for hundreds of images"))

    def __post_init__(self):
        for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.adapter and not self.pretrained_model_name_or_path:
            raise UserError("give --adapter (a trained adapter folder) or --pretrained_model_name_or_path")

    def settings(self) -> dict:
        """What decides the images (recorded in each PNG and in index.json)."""
        return {k: v for k, v in asdict(self).items() if k not in ("prompt", "prompts_file", "output_dir")}

    def prompts(self) -> list[str]:
        """The prompts, in order: --prompt flags, then --prompts_file lines, then --subject's 25."""
        out = list(self.prompt)
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise UserError(f"prompts file {path} does not exist")
            out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if self.subject:
            out += get_subject(self.subject).eval_prompts(self.identifier)
        if not out:
            raise UserError("no prompt: give --prompt, --prompts_file or --subject")
        return out


def _dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def set_adapter_scale(unet, scale: float) -> None:
    """Scale the adapter's update: SingLoRA u -> scale * u_trained; LoRA/DoRA scaling x scale."""
    config = get_config(unet)
    if config.method == "singlora":
        for _, _, layer in singlora_layers(unet):
            layer.set_ramp(unet._dbsl_u * scale)
    else:
        from peft.tuners.lora import LoraLayer

        for m in unet.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", scale)


def load_pipeline(adapter=None, base_model=None, *, device=None, dtype=None, merge: bool = True,
                  scheduler: str | None = None, adapter_scale: float = 1.0, use_xformers: bool = False):
    """A StableDiffusionPipeline with the adapter at `adapter` on its UNet, in one call.

    base_model defaults to the one recorded in the adapter's config. Raises UserError for a
    missing or corrupt adapter, a base model that cannot be loaded, or an adapter trained for
    another architecture.
    """
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline

    meta = read_adapter(adapter)[0] if adapter else {}
    base = base_model or meta.get("base_model")
    if not base:
        raise UserError(f"adapter {adapter} records no base model: give --pretrained_model_name_or_path")
    device = torch.device(device) if device else PartialState().device
    dtype = dtype if isinstance(dtype, torch.dtype) else _dtype(dtype, device)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load base model {base!r}: {first}") from None
    if scheduler:
        import diffusers

        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    if adapter:
        place_adapter(pipe.unet, adapter, adapter_scale=adapter_scale, merge=merge, use_xformers=use_xformers)
    elif use_xformers:
        pipe.enable_xformers_memory_efficient_attention()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place_adapter(unet, adapter, *, adapter_scale: float = 1.0, merge: bool = True,
                  use_xformers: bool = False) -> None:
    """Load the adapter saved at `adapter` onto `unet` at strength `adapter_scale`, merged if asked."""
    load_adapter(unet, adapter, use_xformers=use_xformers)
    if adapter_scale != 1.0:
        set_adapter_scale(unet, adapter_scale)
    if merge:
        merge_adapter(unet)


def sample(pipe, cfg: GenerateConfig, prompts: list[str], ks: list[int]) -> list:
    """One pipeline call: image i of prompts[i] with seed cfg.seed + ks[i], cfg's steps, guidance and size."""
    device = pipe.unet.device
    gens = [torch.Generator(device).manual_seed(cfg.seed + k) for k in ks]
    return pipe(prompts, generator=gens, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width).images


def check_prompt_length(tokenizer, prompt: str) -> None:
    """Warn, showing where it is cut, if `prompt` is longer than the text encoder's 77 tokens."""
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        kept = tokenizer.decode(ids[1:limit - 1])
        dropped = tokenizer.decode(ids[limit - 1:-1])
        logger.warning("prompt is %d tokens, over the %d-token limit: it is cut after %r; dropped: %r",
                       len(ids), limit, kept[-40:], dropped)


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


def write_png(img, path: Path, prompt: str, seed: int, settings: dict) -> None:
    """Save `img` atomically as PNG with its prompt, seed and settings in text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_text("settings", json.dumps(settings))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


class PngWriter:
    """Write PNGs on worker threads while the GPU renders the next batch (PNG encoding of a 512 px image
    takes ~60 ms of CPU: one at a time it would hold the GPU up). At most `max_pending` writes wait.
    A failed write (a full disk, ...) is raised by the next `write` that finds it done, or on leaving
    the `with` block, which waits for every write; if the block itself raised, that error wins and
    failed writes are only logged. Give each write its own image object (PIL keeps a save's options
    on the image while it saves)."""

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
        try:
            for f in self.pending:
                if exc_type is None:
                    f.result()
                elif f.exception() is not None:  # keep the block's own error (e.g. out of memory)
                    logger.error("writing a PNG failed too: %s", f.exception())
        finally:
            self.pool.shutdown(wait=True)
        return False


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
    out = []
    for i in range(0, len(jobs), size):
        batch = jobs[i:i + size]
        n = len(batch)
        if pad and n < size and len(jobs) > size:
            batch = batch + [batch[-1]] * (size - n)
        out.append((batch, n))
    return out


def generate_images(pipe, cfg: GenerateConfig, prompts: list[str] | None = None, output_dir=None,
                    jobs: list | None = None) -> list[dict]:
    """Render `prompts` into output_dir/<slug>/<k>.png (text chunks: prompt, seed, settings).

    Returns one record per image; `jobs` (a sub-list of `plan(...)`) limits the work to those
    images, which is how several processes share a render.
    """
    out = Path(output_dir or cfg.output_dir)
    prompts = prompts if prompts is not None else cfg.prompts()
    for p in dict.fromkeys(prompts):
        check_prompt_length(pipe.tokenizer, p)
    settings = cfg.settings()
    todo = jobs if jobs is not None else plan(prompts, cfg.num_images_per_prompt)
    if cfg.skip_existing:
        todo = [j for j in todo if not (out / j[1] / f"{j[2]}.png").is_file()]
    records = []
    with compiled(pipe, cfg.compile), PngWriter() as writer:
        for batch, n in tqdm(batches(todo, cfg.batch_size, pad=cfg.compile), desc="generating", unit="batch"):
            images = sample(pipe, cfg, [p for p, _, _ in batch], [k for _, _, k in batch])
            for (prompt, slug, k), img in zip(batch[:n], images):
                writer.write(img, out / slug / f"{k}.png", prompt, cfg.seed + k, settings)
                records.append({"prompt": prompt, "slug": slug, "k": k, "seed": cfg.seed + k,
                                "file": f"{slug}/{k}.png"})
    return records


def write_index(cfg: GenerateConfig, prompts: list[str], output_dir=None) -> Path:
    """index.json (every image with prompt and seed, plus the settings) and contact_sheet.png."""
    from PIL import Image

    out = Path(output_dir or cfg.output_dir)
    jobs = plan(prompts, cfg.num_images_per_prompt)
    settings = cfg.settings()
    images = [{"prompt": p, "slug": s, "k": k, "seed": cfg.seed + k, "file": f"{s}/{k}.png"} for p, s, k in jobs]
    write_json_atomic(out / "index.json", {"settings": settings, "images": images})
    thumbs = []
    for rec in images:
        with Image.open(out / rec["file"]) as im:
            im.thumbnail((192, 192))
            thumbs.append(im.convert("RGB"))
    sheet = image_grid(thumbs, cols=cfg.num_images_per_prompt)
    with atomic_path(out / "contact_sheet.png") as tmp:
        sheet.save(tmp, format="PNG")
    return out


def check_writable(folder) -> None:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{id(folder)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


@cli_entry
def main(argv=None):
    cfg = from_args(GenerateConfig, dataclass_parser(GenerateConfig, "dreambooth-singlora generate", __doc__).parse_args(argv))
    prompts = cfg.prompts()
    check_writable(cfg.output_dir)
    pipe = load_pipeline(cfg.adapter, cfg.pretrained_model_name_or_path, dtype=cfg.dtype, merge=cfg.merge,
                         scheduler=cfg.scheduler, adapter_scale=cfg.adapter_scale,
                         use_xformers=cfg.enable_xformers_memory_efficient_attention)
    generate_images(pipe, cfg, prompts)
    out = write_index(cfg, prompts)
    print(f"{len(prompts) * cfg.num_images_per_prompt} images in {out} (index.json, contact_sheet.png)")


if __name__ == "__main__":
    main()
