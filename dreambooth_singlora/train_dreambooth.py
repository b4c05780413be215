"""DreamBooth fine-tuning of Stable Diffusion 1.5 with SingLoRA (or a LoRA / LoRA+ / DoRA baseline).

    accelerate launch -m dreambooth_singlora.train_dreambooth \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --subject dog --dataset_dir ../shared/dreambooth/dataset --output_dir out/dog

One GPU or many (accelerate decides). Latents and text embeddings are computed once; each
step only samples noise, runs the UNet and updates the adapter. A run resumes from its last
checkpoint (`--resume_from_checkpoint latest`) with the same result it would have had.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .adapter import (WEIGHTS_NAME, add_adapter, adapter_state_dict, get_config, load_adapter_state_dict,
                      read_adapter, save_adapter, set_step, trainable_parameters)
from .config import TrainConfig, dataclass_parser, from_args
from .data import image_grid, load_images, prepare
from .errors import UserError, cli_entry
from .fileio import atomic_path, write_json_atomic, write_text_atomic

logger = logging.getLogger("dreambooth_singlora.train")
CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------- models

@dataclass
class Models:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def load_models(cfg: TrainConfig, device, dtype) -> Models:
    """The base model's parts, frozen, on `device` in `dtype` (from the hub or a local folder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src, kw = cfg.pretrained_model_name_or_path, {"revision": cfg.revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=cfg.variant, **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", variant=cfg.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", variant=cfg.variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load base model {src!r}: {first} (give a hub id or a local diffusers "
                        "folder with tokenizer/, text_encoder/, vae/, unet/, scheduler/)") from None
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler)


@torch.no_grad()
def encode_prompt(models: Models, prompt: str) -> torch.Tensor:  # -> (1, 77, D)
    ids = models.tokenizer(prompt, padding="max_length", truncation=True,
                           max_length=models.tokenizer.model_max_length, return_tensors="pt").input_ids
    return models.text_encoder(ids.to(models.text_encoder.device))[0]


# --------------------------------------------------------------------------- data, cached once

class LatentCache:
    """VAE latent distributions (mean, std) of a set of images, kept on the device.

    Sampling mean + std * noise each step is exactly what re-encoding the image would give.
    Flipped copies are cached when random_flip is on; without center_crop, random crops are
    taken from the latent of the whole image in 8-pixel (1-latent) steps.
    """

    def __init__(self, models: Models, images, cfg: TrainConfig, device):
        self.size = cfg.resolution // 8
        self.scaling = models.vae.config.scaling_factor
        self.items = []  # per image: list of (mean, std) for [plain, flipped]
        for img in tqdm(images, desc="caching latents", leave=False):
            x = prepare(img, cfg.resolution, cfg.center_crop).to(device, models.vae.dtype)[None]  # (1,3,H,W)
            views = [x, x.flip(-1)] if cfg.random_flip else [x]
            with torch.no_grad():
                dists = [models.vae.encode(v).latent_dist for v in views]
            self.items.append([(d.mean[0].float(), d.std[0].float()) for d in dists])  # (4, h, w) each

    def sample(self, rng: random.Random, gen: torch.Generator, n: int) -> torch.Tensor:  # -> (n, 4, s, s)
        out = []
        for _ in range(n):
            views = self.items[rng.randrange(len(self.items))]
            mean, std = views[rng.randrange(len(views))]
            top, left = rng.randint(0, mean.shape[1] - self.size), rng.randint(0, mean.shape[2] - self.size)
            crop = (slice(None), slice(top, top + self.size), slice(left, left + self.size))
            out.append((mean[crop], std[crop]))
        mean, std = torch.stack([m for m, _ in out]), torch.stack([s for _, s in out])
        return (mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)) * self.scaling


def sampling_pipeline(models: Models, unet):
    """A StableDiffusionPipeline over the loaded parts with a DPM++ sampler (class images, validation)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(
                                       models.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ensure_class_images(cfg: TrainConfig, accelerator, models: Models) -> None:
    """Generate the class images prior preservation needs with the base model, once; reuse them after."""
    from .data import list_images

    folder = Path(cfg.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    start = len(list_images(folder))  # listed once, and every process has listed before any writes
    accelerator.wait_for_everyone()
    missing = cfg.num_class_images - start
    if missing <= 0:
        return
    logger.info("generating %d class images for %r in %s", missing, cfg.class_prompt, folder)
    pipe = sampling_pipeline(models, models.unet)
    indices = list(range(start, start + missing))
    with accelerator.split_between_processes(indices) as mine:
        for i in tqdm(range(0, len(mine), cfg.sample_batch_size), desc="class images",
                      disable=not accelerator.is_local_main_process):
            batch = mine[i:i + cfg.sample_batch_size]
            gen = [torch.Generator(accelerator.device).manual_seed(cfg.seed * 100_003 + j) for j in batch]
            images = pipe([cfg.class_prompt] * len(batch), generator=gen, height=cfg.resolution,
                          width=cfg.resolution, num_inference_steps=25).images
            for j, im in zip(batch, images):
                with atomic_path(folder / f"class-{j:05d}.png") as tmp:
                    im.save(tmp, format="PNG")
    accelerator.wait_for_everyone()


class TrainData:
    """Everything a step reads, computed once: latents of the photos (and class images), prompt embeddings."""

    def __init__(self, cfg: TrainConfig, accelerator, models: Models):
        images, paths = load_images(cfg.instance_data_dir, "instance")
        logger.info("instance images: %d from %s", len(images), cfg.instance_data_dir)
        self.paths = paths
        self.instance = LatentCache(models, images, cfg, accelerator.device)
        self.instance_emb = encode_prompt(models, cfg.instance_prompt)
        self.prior = None
        if cfg.with_prior_preservation:
            ensure_class_images(cfg, accelerator, models)
            class_images, _ = load_images(cfg.class_data_dir, "class")
            self.prior = LatentCache(models, class_images[: cfg.num_class_images], cfg, accelerator.device)
            self.class_emb = encode_prompt(models, cfg.class_prompt)
        self.bsz, self.seed, self.rank = cfg.train_batch_size, cfg.seed, accelerator.process_index
        self.gen = torch.Generator(accelerator.device)

    def batch(self, step: int, micro: int):
        """(latents, text embeddings, noise generator) of one micro-batch, a pure function of
        (seed, step, micro, process): a resumed run draws exactly what the uninterrupted one did."""
        key = hash((self.seed, step, micro, self.rank)) & 0x7FFF_FFFF_FFFF
        rng = random.Random(key)
        self.gen.manual_seed(key)
        latents = self.instance.sample(rng, self.gen, self.bsz)
        emb = self.instance_emb.expand(self.bsz, -1, -1)
        if self.prior is not None:
            latents = torch.cat([latents, self.prior.sample(rng, self.gen, self.bsz)])
            emb = torch.cat([emb, self.class_emb.expand(self.bsz, -1, -1)])
        return latents, emb, self.gen


def compute_loss(denoise, noise_scheduler, latents, emb, gen, prior_loss_weight: float | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """The diffusion loss of one batch (+ prior-preservation loss on its second half).
    `denoise(noisy, t, emb)` is the UNet's prediction (eager, or CUDA-graphed)."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=gen, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t).to(dtype)
    pred = denoise(noisy, t, emb).float()
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    if prior_loss_weight is None:
        return F.mse_loss(pred, target)
    pred, pred_prior = pred.chunk(2)
    target, target_prior = target.chunk(2)
    return F.mse_loss(pred, target) + prior_loss_weight * F.mse_loss(pred_prior, target_prior)


class _Denoise(torch.nn.Module):
    def __init__(self, unet, dtype):
        super().__init__()
        self.unet, self.dtype = unet, dtype

    def forward(self, noisy, t, emb):  # (B,4,h,w), (B,), (B,77,D) -> (B,4,h,w)
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
            return self.unet(noisy, t, emb, return_dict=False)[0]


def graph_unet(unet, batch, dtype):
    """The UNet's forward and backward captured as CUDA graphs (shapes are static in DreamBooth).

    At batch 1 an eager step is bound by kernel launches, not by the GPU; replaying a graph
    launches the whole forward (or backward) at once: the same kernels. Not used with gradient
    accumulation (the graphed backward's gradient buffers would alias across micro-batches)."""
    latents, emb, _ = batch
    sample = (latents.to(dtype), torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device), emb.clone())
    logger.info("capturing the UNet forward/backward as CUDA graphs (--no-cuda_graphs to turn off)")
    return torch.cuda.make_graphed_callables(_Denoise(unet, dtype), sample)


# --------------------------------------------------------------------------- optimizer, checkpoints

def make_optimizer(cfg: TrainConfig, unet, device):
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
        if device.type == "cuda" and cfg.fused_adam:
            kw["fused"] = True  # one kernel for all adapter tensors
    if cfg.method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(unet, opt_cls, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                         loraplus_weight_decay=cfg.adam_weight_decay, **kw)
    return opt_cls(trainable_parameters(unet), **kw)


def save_checkpoint(cfg: TrainConfig, unet, optimizer, lr_scheduler, step: int, history: list) -> Path:
    """checkpoints/checkpoint-<step>/: the adapter (usable as is), optimizer and schedule state.

    Written into a temporary folder and renamed into place, so a kill or a full disk never
    leaves a half-written checkpoint where `latest` would find it."""
    root = Path(cfg.output_dir) / CHECKPOINTS
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(unet, tmp, base_model=cfg.pretrained_model_name_or_path)
    write_json_atomic(tmp / "trainer_state.json", {  # written last: its presence marks a complete checkpoint
        "step": step, "optimizer": save_optimizer_state(optimizer, tmp),
        "lr_scheduler": _jsonable(lr_scheduler.state_dict()), "history": history, "config": cfg.to_dict()})
    return commit_checkpoint(tmp, final, cfg.checkpoints_total_limit)


def save_optimizer_state(optimizer, folder: Path) -> dict:
    """Write the optimizer's tensors to <folder>/optimizer.safetensors (atomically); returns the rest
    (param_groups, and plain-number state such as bitsandbytes' int step) as JSON for trainer_state."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    with atomic_path(folder / "optimizer.safetensors") as tmp:
        save_file({f"state.{i}.{k}": v.detach().cpu().contiguous()
                   for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}, str(tmp))
    scalars = {f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if isinstance(v, (int, float))}
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, folder: Path, saved: dict) -> None:
    """The inverse of save_optimizer_state (safetensors: no pickle is ever loaded)."""
    from safetensors.torch import load_file

    state: dict = {}
    for name, v in load_file(str(folder / "optimizer.safetensors")).items():
        _, i, k = name.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    for name, v in saved.get("scalars", {}).items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def commit_checkpoint(tmp: Path, final: Path, limit: int | None) -> Path:
    """Rename the fully written folder `tmp` to `final`, then keep only the newest `limit` checkpoints."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if limit:
        for old in list_checkpoints(final.parent)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary ones from an interrupted save are ignored)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("checkpoint-*")
            if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-", 1)[1]))


def load_checkpoint(cfg: TrainConfig, unet, optimizer, lr_scheduler) -> tuple[int, list]:
    """Restore adapter, optimizer and schedule from --resume_from_checkpoint; returns (step, history)."""
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(Path(cfg.output_dir) / CHECKPOINTS)
        if not found:
            logger.info("no checkpoint in %s: starting from step 0", Path(cfg.output_dir) / CHECKPOINTS)
            return 0, []
        path = found[-1]
    else:
        path = Path(cfg.resume_from_checkpoint)
    meta, tensors = read_adapter(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file() or not (path / "optimizer.safetensors").is_file():
        raise UserError(f"{path} is an adapter, not a training checkpoint (no trainer_state.json / optimizer state)")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path} has a corrupt trainer_state.json ({e}); resume from an older "
                        "checkpoint folder or start a new --output_dir") from None
    ours = get_config(unet).to_dict()
    for key in ("method", "rank", "alpha", "target_modules", "init", "ramp_steps"):
        if meta.get(key) != ours.get(key):
            raise UserError(f"checkpoint {path} was trained with {key}={meta.get(key)!r}, this run has "
                            f"{ours.get(key)!r}: resume with the same settings or start a new --output_dir")
    load_adapter_state_dict(unet, tensors)
    try:
        load_optimizer_state(optimizer, path, state["optimizer"])
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint {path} has an unreadable optimizer state ({type(e).__name__}: {e}); resume "
                        "from an older checkpoint folder or start a new --output_dir") from None
    lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **state["lr_scheduler"]})
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), state.get("history", [])


# --------------------------------------------------------------------------- what a person sees

@torch.no_grad()
def validate(cfg: TrainConfig, accelerator, models: Models, unet, step: int) -> None:
    """Render --validation_prompt with the current adapter: a grid PNG and tensorboard images."""
    import numpy as np

    pipe = sampling_pipeline(models, unet)
    gen = torch.Generator(accelerator.device).manual_seed(cfg.seed)
    unet.eval()
    with accelerator.autocast():
        images = pipe([cfg.validation_prompt] * cfg.num_validation_images, generator=gen, height=cfg.resolution,
                      width=cfg.resolution, num_inference_steps=25).images
    grid = image_grid(images, cols=4)
    with atomic_path(Path(cfg.output_dir) / "validation" / f"step-{step:05d}.png") as tmp:
        grid.save(tmp, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")


def plot_loss(history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        ax.plot([h[0] for h in history], [h[1] for h in history])
    ax.set(xlabel="optimizer step", ylabel="loss (mean over log window)", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def model_card(cfg: TrainConfig, step: int, n_params: int, seconds: float) -> str:
    c = cfg.adapter_config()
    return f"""# {cfg.method} adapter: "{cfg.instance_prompt}"

DreamBooth adapter for `{cfg.pretrained_model_name_or_path}`, trained with dreambooth-singlora {__version__}.

| setting | value |
|---|---|
| method | {c.method} (rank {c.rank}, alpha {c.alpha:g}, targets {', '.join(c.target_modules)}) |
| SingLoRA init / ramp | {c.init} / T = {c.ramp_steps} steps |
| trainable parameters | {n_params:,} |
| steps | {step} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}) |
| learning rate | {cfg.learning_rate:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}) |
| resolution | {cfg.resolution} (center crop: {cfg.center_crop}, flip: {cfg.random_flip}) |
| prior preservation | {cfg.with_prior_preservation} ({cfg.class_prompt or '-'}) |
| seed | {cfg.seed} |
| wall time | {seconds:.0f} s |

![loss](loss_curve.png)

## Use it

```bash
dreambooth-singlora generate --adapter {cfg.output_dir} --prompt "{cfg.instance_prompt} on the beach"
dreambooth-singlora export --adapter {cfg.output_dir} --format kohya --output {Path(cfg.output_dir).name}.safetensors
```

```python
from dreambooth_singlora.generate import load_pipeline
pipe = load_pipeline("{cfg.output_dir}")
image = pipe("{cfg.instance_prompt} on the beach").images[0]
```

The exported kohya file loads in A1111, ComfyUI and diffusers (`pipe.load_lora_weights(...)`).
All settings are in `adapter_config.json` and `checkpoints/*/trainer_state.json`.
"""


# --------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> Path:
    """Run DreamBooth training as `cfg` says; returns the output folder holding the adapter."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    # 1. set-up: accelerate decides devices and processes; frozen models in half precision
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    set_seed(cfg.seed)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = load_models(cfg, accelerator.device, dtype)

    # 2. data, once: latents of every photo (and class image), prompt embeddings
    data = TrainData(cfg, accelerator, models)
    if cfg.validation_prompt is None:  # nothing needs the VAE or the text encoder again
        models.vae = models.text_encoder = None
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()

    # 3. the adapter (fp32) and its optimizer
    add_adapter(models.unet, cfg.adapter_config(), use_xformers=cfg.enable_xformers_memory_efficient_attention)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in trainable_parameters(models.unet))
    optimizer = make_optimizer(cfg, models.unet, accelerator.device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    base = accelerator.unwrap_model(unet)

    # 4. resume: adapter, optimizer, schedule, step; the data of step t is a function of t
    step, history = load_checkpoint(cfg, base, optimizer, lr_scheduler) if cfg.resume_from_checkpoint else (0, [])
    u = set_step(base, step)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-singlora", config={k: str(v) for k, v in cfg.to_dict().items()})
        logger.info("%s: %s trainable parameters, steps %d -> %d", cfg.method, f"{n_params:,}", step,
                    cfg.max_train_steps)
    params = trainable_parameters(base)
    denoise = lambda noisy, t, e: unet(noisy, t, e).sample  # noqa: E731
    # graphed backward hands back its own gradient buffers: accumulating over micro-batches would alias them
    graphed = cfg.cuda_graphs and accelerator.device.type == "cuda" and accelerator.num_processes == 1 \
        and not cfg.gradient_checkpointing and cfg.gradient_accumulation_steps == 1
    if graphed:
        denoise = graph_unet(accelerator.unwrap_model(unet, keep_fp32_wrapper=False), data.batch(0, 0), dtype)
    prior_w = cfg.prior_loss_weight if cfg.with_prior_preservation else None
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    loss_sum, n_sum, t0 = torch.zeros((), device=accelerator.device), 0, time.time()

    # 5. the loop: sample, forward, backward, update; read the loss back only every log_every steps
    unet.train()
    first_step, loop_start = step, _sync_time(accelerator.device)
    while step < cfg.max_train_steps:
        step_loss = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(unet):
                latents, emb, gen = data.batch(step, micro)
                loss = compute_loss(denoise, models.noise_scheduler, latents, emb, gen, prior_w, dtype)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss = step_loss + loss.detach() / cfg.gradient_accumulation_steps
        if accelerator.optimizer_step_was_skipped:  # fp16 overflow: no optimizer step, so t and u stay
            continue
        loss_sum += step_loss
        step, n_sum = step + 1, n_sum + 1
        u = set_step(base, step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_train_steps:
            mean = accelerator.reduce(loss_sum, reduction="mean").item() / n_sum
            loss_sum.zero_()
            n_sum = 0
            check_finite(mean, None, step, cfg)
            lr = lr_scheduler.get_last_lr()[0]
            history.append([step, mean])
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", u=f"{u:.2f}")
            accelerator.log({"loss": mean, "lr": lr, "u": u}, step=step)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            check_finite(0.0, params, step, cfg)
            if accelerator.is_main_process:
                save_checkpoint(cfg, base, optimizer, lr_scheduler, step, history)
        if cfg.validation_prompt and step % cfg.validation_steps == 0 and accelerator.is_main_process:
            validate(cfg, accelerator, models, base, step)
            unet.train()
    bar.close()
    loop_seconds = _sync_time(accelerator.device) - loop_start

    # 6. the result: adapter, model card, loss curve (main process only)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(base, out, base_model=cfg.pretrained_model_name_or_path)
        plot_loss(history, out / "loss_curve.png")
        write_text_atomic(out / "README.md", model_card(cfg, step, n_params, time.time() - t0))
        write_json_atomic(out / "train_stats.json", {
            "steps_run": step - first_step, "loop_seconds": loop_seconds,
            "it_per_s": (step - first_step) / loop_seconds if loop_seconds > 0 else None,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cuda_graphs": graphed, "trainable_parameters": n_params,
            "num_processes": accelerator.num_processes})
        logger.info("adapter saved to %s", out)
    accelerator.end_training()
    return out


def _sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_finite(loss: float, params, step: int, cfg: TrainConfig) -> None:
    """Stop with a clear message if the loss (or, when given, any adapter weight) is not finite."""
    if math.isfinite(loss) and (params is None or torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    found = list_checkpoints(Path(cfg.output_dir) / CHECKPOINTS)
    keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved before it"
    raise UserError(f"loss became non-finite by step {step}; training stopped and {keep}. "
                    "Lower --learning_rate or use --mixed_precision bf16 instead of fp16")


# --------------------------------------------------------------------------- CLI

@cli_entry
def main(argv=None):
    cfg = from_args(TrainConfig, dataclass_parser(TrainConfig, "dreambooth-singlora train", __doc__).parse_args(argv))
    train(cfg)


if __name__ == "__main__":
    main()
