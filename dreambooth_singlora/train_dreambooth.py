"""DreamBooth fine-tuning of Stable Diffusion (1.x, 2.x, XL) with SingLoRA (or a LoRA / LoRA+ / DoRA baseline).

    accelerate launch -m dreambooth_singlora.train_dreambooth \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --subject dog --dataset_dir dreambooth/dataset --output_dir runs/dog/adapter
    ... --subjects dog cat2 backpack (or --subjects all) --output_dir runs/all    # one adapter each
    ... --instance_data_dir my_photos --instance_prompt "a photo of sks cat"     # your own photos
    ... --events run.jsonl      # every step, checkpoint and the end as JSON lines another process can follow

The base model's family (SD 1.x, SD 2.x, SDXL) is read from its model_index.json; everything that differs
between families lives in base.py. Ctrl-C, SIGTERM or a file named STOP in --output_dir (or --stop_file) ends
the run at the next step with a checkpoint: the same command resumes it.

One loop trains a group of 1..N subjects. A group of one is the plain adapter (SingLoRA's processors,
or PEFT's layers for the baselines) with everything accelerate gives a single run: several GPUs (DDP),
CUDA graphs on one GPU, fp16 loss scaling, 8-bit Adam, DoRA. Several subjects in one batch go through
an adapter bank (one adapter per subject, each sample routed through its own): subject s draws at step
t exactly the data its own single run draws, the loss is the sum of the subjects' mean losses,
gradients are clipped per subject and AdamW is elementwise, so each adapter is the one its own run
gives. Latents and text embeddings are computed once; each step only samples noise, runs the UNet and
updates the adapters. A run resumes from its last checkpoint (`--resume_from_checkpoint latest`) with
the same result it would have had.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .adapter import (add_adapter, adapter_state_dict, load_adapter_state_dict, read_adapter, save_adapter, set_step,
                      trainable_parameters)
from .bank import (BANKED, add_bank, bank_parameters, bank_state_dict, clip_grad_norm_per_row_, remove_bank,
                   row_to_staging)
from .base import Base, Family, default_resolution, detect_family
from .checkpoint import (BANK_NAME, checkpoint_root, find_checkpoint, list_checkpoints, load_checkpoint, read_state,
                         remove_checkpoints, save_checkpoint)
from .config import TrainConfig, from_args, train_parser
from .data import image_grid, load_images, prepared, use_cpu_threads
from .errors import UserError, cli_entry, end_process, observed
from .events import STOP_NAME, Bar, LogLines, StopRequest, Tracker, job
from .fileio import WriteError, atomic_path, check_writable, write_error, write_json_atomic, write_text_atomic
from .results import model_card, plot_loss
from .singlora import at_least_fp32

logger = get_logger("dreambooth_singlora.train")  # info lines from the main process only
MAX_SKIPPED_STEPS = 100  # fp16 overflows in a row before the run stops as non-finite
LATENT_FACTOR = 8  # pixels per latent of SD 1.x, 2.x and XL's VAEs


# --------------------------------------------------------------------------- the subjects of a run

@dataclass
class Member:
    """One subject of a run: its photos (read before any model loads), prompts and output folder."""
    name: str
    images: list
    instance_prompt: str
    class_prompt: str | None
    class_data_dir: str | None
    output_dir: Path
    photos: list  # [name, bytes] of each photo read: with the settings, what tells this run from another
    holdout: list = field(default_factory=list)  # names of the photos kept out of training (--holdout), never read


def plan_members(cfg: TrainConfig) -> tuple[Family, list[Member]]:
    """The base's family and every subject of the run, each input checked and each photo read: bad input fails
    here, in a second, before any model loads."""
    from .prompts import get_subject, slugify

    check_writable(cfg.output_dir)
    if cfg.report_to == "tensorboard":
        check_writable(Path(cfg.output_dir) / "logs")
    if cfg.with_prior_preservation and cfg.class_data_dir:
        check_writable(cfg.class_data_dir)
    family = detect_family(cfg.pretrained_model_name_or_path, cfg.revision, cfg.base_config)  # else refused here
    if cfg.subjects is None:
        if cfg.subject and cfg.dataset_dir and Path(cfg.instance_data_dir) != Path(cfg.dataset_dir) / cfg.subject:
            logger.warning("training on the photos in %s with subject %s's prompt %r (--instance_data_dir wins "
                           "over --subject's photos)", cfg.instance_data_dir, cfg.subject, cfg.instance_prompt)
        plan = [(cfg.subject or Path(cfg.output_dir).name, cfg.instance_data_dir, cfg.instance_prompt, cfg.class_prompt,
                 cfg.class_data_dir, Path(cfg.output_dir))]
    else:
        missing = [n for n in cfg.subjects if not (Path(cfg.dataset_dir) / n).is_dir()]
        if missing:
            raise UserError(f"no photo folder for {len(missing)} subject(s) in {cfg.dataset_dir}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        plan = []
        for n in cfg.subjects:
            s = get_subject(n)
            classes = Path(cfg.output_dir) / "class_images" / slugify(s.class_prompt())  # one set per class prompt
            plan.append((n, Path(cfg.dataset_dir) / n, s.instance_prompt(cfg.identifier), s.class_prompt(),
                         str(classes) if cfg.with_prior_preservation else None, Path(cfg.output_dir) / n))
    members = []
    for name, folder, *prompts_and_classes, out in plan:
        held = held_out(folder, cfg.holdout, cfg.seed)
        images, paths = load_images(folder, "instance", exclude=held)
        members.append(Member(name, images, *prompts_and_classes, out, [[p.name, p.stat().st_size] for p in paths],
                              held))
    return family, members


def held_out(folder, k: int, seed: int) -> list[str]:
    """The names of the `k` photos of `folder` that --holdout keeps out of training, chosen by `seed` (sorted);
    UserError unless at least one photo is left to train on."""
    if not k:
        return []
    from .data import list_images

    names = [p.name for p in list_images(folder)]
    if k >= len(names):
        raise UserError(f"--holdout {k} would keep all {len(names)} photos of {folder} out of training: give at "
                        f"most {len(names) - 1}")
    return sorted(random.Random(seed).sample(names, k))


#: the settings that decide what an adapter learns (not how long, where it is logged or checkpointed)
RUN_KEYS = ("pretrained_model_name_or_path", "revision", "variant", "seed", "resolution", "center_crop",
            "random_flip", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "use_8bit_adam",
            "max_grad_norm", "with_prior_preservation", "prior_loss_weight", "num_class_images", "identifier",
            "method", "rank", "alpha", "ramp_steps", "init", "target_modules", "loraplus_lr_ratio")
#: settings recorded only where given (so that the runs of earlier versions, which had none, stay the same run)
RUN_KEYS_IF_SET = ("holdout", "pretrained_vae_model_name_or_path", "base_config")


def run_of(cfg: TrainConfig, member: Member) -> dict:
    """What identifies the run that trains `member`: its subject, prompts, photos and the settings of RUN_KEYS.
    Saved with each adapter and checkpoint; a folder holding another run's is never taken for this one's."""
    d = {**cfg.to_dict(), "holdout": member.holdout}
    return {"subject": member.name, "instance_prompt": member.instance_prompt, "class_prompt": member.class_prompt,
            "photos": member.photos, **{k: d[k] for k in RUN_KEYS}, **{k: d[k] for k in RUN_KEYS_IF_SET if d[k]}}


def run_differs(cfg: TrainConfig, member: Member, recorded: dict | None) -> str | None:
    """The first key in which `recorded` (what an adapter or checkpoint saved) is not run_of(cfg, member), a key
    only one of them has included; None if they are equal."""
    ours, recorded = run_of(cfg, member), recorded or {}
    return next((k for k in {**ours, **recorded} if k not in ours or k not in recorded or ours[k] != recorded[k]), None)


def check_not_another_run(cfg: TrainConfig, member: Member) -> bool:
    """True if the member's folder holds its finished adapter; UserError if it holds another run's adapter
    (other photos, subject or settings), unless --overwrite; False otherwise."""
    try:
        meta, _ = read_adapter(member.output_dir)
    except UserError:
        return False
    diff = run_differs(cfg, member, meta.get("run"))
    if diff is None:
        return bool(cfg.resume_from_checkpoint) and meta.get("step") == cfg.max_train_steps
    if cfg.overwrite:
        return False
    diff = diff if meta.get("run") else "its settings (written by 0.1)"
    raise UserError(f"{member.output_dir} holds the adapter of another run ({diff} differs): give another "
                    "--output_dir, or --overwrite to replace it")


def check_group_size(cfg: TrainConfig, size: int, accelerator=None) -> None:
    """What a bank (several subjects in one batch) cannot do: one line that names the way that works.
    Called with the flags alone before anything starts, then with the accelerator accelerate configured."""
    if size < 2:
        return
    one = "or train the subjects one at a time with --subjects_per_batch 1"
    if cfg.method not in BANKED:
        raise UserError(f"--method {cfg.method} does not batch subjects (its per-row weight norm needs the full "
                        f"weight per subject): give --subjects_per_batch 1 to train them one at a time")
    if accelerator is not None and accelerator.num_processes > 1:
        raise UserError(f"several subjects in one batch run in one process: launch with one process, {one} "
                        "(each subject then trains data-parallel over the processes)")
    precision = accelerator.mixed_precision if accelerator is not None else cfg.mixed_precision
    for bad, why in ((precision == "fp16", "fp16 loss scaling would skip every subject's step "
                      "when one overflows: use --mixed_precision bf16"),
                     (cfg.use_8bit_adam, "8-bit Adam's block-wise quantisation would couple the subjects"),
                     (cfg.validation_prompt, "validation renders one adapter")):
        if bad:
            raise UserError(f"a batch of {size} subjects cannot do this: {why}, {one}")


# --------------------------------------------------------------------------- data, cached once

class LatentCache:
    """VAE latent distributions (mean, std) of a set of images, kept on the device.

    Sampling mean + std * noise each step is exactly what re-encoding the image would give.
    Flipped copies are cached when random_flip is on; without center_crop, random crops are
    taken from the latent of the whole image in 8-pixel (1-latent) steps. Each sample's conditioning
    that follows its image (SDXL's original size and crop) comes with it.
    """

    def __init__(self, base: Base, images, cfg: TrainConfig, device, show: bool = True):
        self.base, self.resolution = base, cfg.resolution
        # crops of resolution / 8 latents: the VAE factor of every supported family (a tiny test VAE with a smaller
        # factor then trains on crops of its latents, as it always has: runs of earlier versions stay reproducible)
        self.size = cfg.resolution // LATENT_FACTOR
        self.items = []  # per image: list of (mean, std) for [plain, flipped]
        self.geometry = []  # per image: (original (h, w), the prepared crop's (top, left))
        for img in tqdm(images, desc="caching latents", leave=False, disable=not show):
            x, offset = prepared(img, cfg.resolution, cfg.center_crop)
            x = x.to(device)[None]  # (1,3,H,W)
            views = [x, x.flip(-1)] if cfg.random_flip else [x]
            dists = [base.latent_dist(v) for v in views]
            self.items.append([(at_least_fp32(m[0]), at_least_fp32(s[0])) for m, s in dists])  # (4, h, w) each
            self.geometry.append(((img.height, img.width), offset))

    def sample(self, rng: random.Random, gen: torch.Generator, n: int):  # -> (n, 4, s, s), {key: (n, ...)}
        out, cond = [], []
        for _ in range(n):
            i = rng.randrange(len(self.items))
            views = self.items[i]
            mean, std = views[rng.randrange(len(views))]
            top, left = rng.randint(0, mean.shape[1] - self.size), rng.randint(0, mean.shape[2] - self.size)
            crop = (slice(None), slice(top, top + self.size), slice(left, left + self.size))
            out.append((mean[crop], std[crop]))
            original, (y, x) = self.geometry[i]
            f = LATENT_FACTOR
            cond.append(self.base.image_conditioning(original, (y + top * f, x + left * f),
                                                     (self.resolution, self.resolution)))
        mean, std = torch.stack([m for m, _ in out]), torch.stack([s for _, s in out])
        extra = {k: torch.cat([c[k] for c in cond]).to(mean.device) for k in cond[0]}
        return self.base.scale_latents(mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)), extra


def ensure_class_images(cfg: TrainConfig, member: Member, accelerator, base: Base) -> None:
    """Generate the class images prior preservation needs with the base model, once; reuse them after."""
    from .data import list_images
    from .generate import Job, render

    folder = Path(member.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    start = len(list_images(folder))  # listed once, and every process has listed before any writes
    accelerator.wait_for_everyone()
    missing = cfg.num_class_images - start
    if missing <= 0:
        return
    logger.info("generating %d class images for %r in %s", missing, member.class_prompt, folder)
    with accelerator.split_between_processes(list(range(start, start + missing))) as mine:
        render(base.pipeline(scheduler="dpm++"), render_config(cfg, folder, cfg.sample_batch_size),
               [Job(member.class_prompt, cfg.seed * 100_003 + j, folder / f"class-{j:05d}.png", {}) for j in mine],
               desc="class images", show=accelerator.is_main_process)
    accelerator.wait_for_everyone()


def render_config(cfg: TrainConfig, folder: Path, batch_size: int):
    """How the trainer renders (class images, validation): the base model's own size, 25 steps, every image
    rendered again; each job carries its own seed."""
    from .config import GenerateConfig

    return GenerateConfig(pretrained_model_name_or_path=cfg.pretrained_model_name_or_path, num_inference_steps=25,
                          height=cfg.resolution, width=cfg.resolution, batch_size=batch_size, skip_existing=False,
                          output_dir=str(folder))


def batch_key(*numbers: int) -> int:
    """A 47-bit key of a tuple of ints that never changes: CPython's tuple hash (xxHash-based, 64-bit builds),
    written out, so that a resume on another Python version (or implementation) draws what the interrupted run
    would have drawn, and runs of earlier versions (which called hash()) are reproduced exactly."""
    p1, p2, p5, mask, modulus = 11400714785074694791, 14029467366897019727, 2870177450012600261, 2**64 - 1, 2**61 - 1
    acc = p5
    for n in numbers:
        lane = n % modulus if n >= 0 else -((-n) % modulus)  # hash(int) on 64-bit CPython
        lane = (-2 if lane == -1 else lane) & mask
        acc = (acc + lane * p2) & mask
        acc = ((acc << 31) | (acc >> 33)) & mask
        acc = (acc * p1) & mask
    acc = (acc + (len(numbers) ^ (p5 ^ 3527539))) & mask
    return (1546275796 if acc == mask else acc) & 0x7FFF_FFFF_FFFF


class TrainData:
    """Everything a step reads of one subject, computed once: latents of its photos (and class images),
    prompt conditioning."""

    def __init__(self, cfg: TrainConfig, member: Member, accelerator, base: Base):
        logger.info("%s: %d instance images%s", member.name, len(member.images),
                    f" ({len(member.holdout)} held out: {', '.join(member.holdout)})" if member.holdout else "")
        show = accelerator.is_main_process
        self.instance = LatentCache(base, member.images, cfg, accelerator.device, show)
        self.instance_cond = base.encode_prompt(member.instance_prompt)
        self.prior = None
        if cfg.with_prior_preservation:
            ensure_class_images(cfg, member, accelerator, base)
            class_images, _ = load_images(member.class_data_dir, "class")
            self.prior = LatentCache(base, class_images[: cfg.num_class_images], cfg, accelerator.device, show)
            self.class_cond = base.encode_prompt(member.class_prompt)
        self.bsz, self.seed, self.rank = cfg.train_batch_size, cfg.seed, accelerator.process_index
        self.gen = torch.Generator(accelerator.device)

    def batch(self, step: int, micro: int):
        """(latents, conditioning {key: (B, ...)}, noise generator) of one micro-batch, a pure function of
        (seed, step, micro, process): a resumed run draws exactly what the uninterrupted one did,
        and a subject in a bank draws exactly what its own run does."""
        key = batch_key(self.seed, step, micro, self.rank)
        rng = random.Random(key)
        self.gen.manual_seed(key)
        latents, extra = self.instance.sample(rng, self.gen, self.bsz)
        cond = {**expand(self.instance_cond, self.bsz), **extra}
        if self.prior is not None:
            prior, prior_extra = self.prior.sample(rng, self.gen, self.bsz)
            latents = torch.cat([latents, prior])
            cond = cat_cond([cond, {**expand(self.class_cond, self.bsz), **prior_extra}])
        return latents, cond, self.gen


def expand(cond: dict, n: int) -> dict:
    """A batch-1 conditioning dict as batch n (views, no copies)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def cat_cond(conds: list[dict]) -> dict:
    """Conditioning dicts of several batches as one batch (concatenated in order)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def group_losses(denoise, base: Base, datas: list[TrainData], step: int, micro: int,
                 prior_loss_weight: float | None, dtype: torch.dtype) -> torch.Tensor:
    """Each subject's diffusion loss (+ prior-preservation loss on its class samples), (S,), in one UNet call.

    The batch is subject-major ([subject 0's samples, subject 1's, ...], instance then class samples
    within a subject); subject i's noise and timesteps come from its own generator, as in its own run.
    `denoise(noisy, t, *conditioning)` is the UNet's prediction (eager or CUDA-graphed)."""
    lat, conds, noise, ts = [], [], [], []
    for d in datas:
        latents, c, gen = d.batch(step, micro)
        noise.append(torch.randn(latents.shape, generator=gen, device=latents.device))
        ts.append(torch.randint(0, base.num_train_timesteps, (latents.shape[0],), generator=gen,
                                device=latents.device))
        lat.append(latents)
        conds.append(c)
    latents, noise, t, cond = torch.cat(lat), torch.cat(noise), torch.cat(ts), cat_cond(conds)  # (S*m, ...)
    pred = at_least_fp32(denoise(base.add_noise(latents, noise, t).to(dtype), t, *cond.values()))
    target = base.target(latents, noise, t)
    parts = 1 if prior_loss_weight is None else 2
    err = (pred - target).square().reshape(len(datas), parts, -1).mean(-1)  # (S, 1 | 2): instance, class
    return err[:, 0] if prior_loss_weight is None else err[:, 0] + prior_loss_weight * err[:, 1]


class Denoise(torch.nn.Module):
    """The UNet's noise prediction (what gets CUDA-graphed): in the UNet's own dtype, as loaded, or under
    torch.autocast in `dtype` (`autocast`), which runs the norms and other fp32-listed ops in fp32. The
    conditioning comes as tensors in the order of `keys` (graphs take tensors), the base turns it into the
    UNet's keyword arguments."""

    def __init__(self, unet, dtype, keys, autocast: bool = False):
        super().__init__()
        self.unet, self.dtype, self.keys = unet, dtype, tuple(keys)
        self.autocast = autocast and dtype in (torch.float16, torch.bfloat16)

    def forward(self, noisy, t, *cond):  # (B,4,h,w), (B,), (B,77,D) [, ...] -> (B,4,h,w)
        kwargs = Base.unet_kwargs(dict(zip(self.keys, cond)))
        with torch.autocast(noisy.device.type, dtype=self.dtype, enabled=self.autocast, cache_enabled=False):
            return self.unet(noisy, t, return_dict=False, **kwargs)[0]


def draws_random(unet) -> bool:
    """Whether the UNet's training forward draws random numbers (a dropout of any kind with p > 0; SD's UNets have
    none)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in unet.modules())


def enable_checkpointing(unet) -> None:
    """--gradient_checkpointing: diffusers' block checkpointing (non-reentrant), saving and restoring the RNG state
    around each block only where a dropout draws from it. diffusers' default saves it always: work for nothing in SD's
    UNets, and a read of the CUDA generator, which CUDA graph capture refused (pytorch/pytorch#83148: checkpoint under
    make_graphed_callables; pytorch/pytorch#162505 lets newer releases through in the case checkpoint needs). The
    trainer runs a checkpointed UNet eagerly; graphing it is the next step, to be measured on a GPU first
    (benchmarks/check_graphed_checkpointing.py compares its gradients with the eager ones, benchmarks/profile_step.py's
    `checkpointing` variant times it against `checkpointing+eager`). The dropouts are looked for once, here: a dropout
    added to the UNet afterwards is not seen."""
    keep_rng = draws_random(unet)

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 preserve_rng_state=keep_rng)

    unet.enable_gradient_checkpointing(checkpointed)


def graph_unet(unet, batch, dtype, autocast: bool = False):
    """The UNet's forward and backward captured as CUDA graphs (shapes are static in DreamBooth).

    At batch 1 an eager step is bound by kernel launches, not by the GPU; replaying a graph
    launches the whole forward (or backward) at once: the same kernels. Not used with gradient
    accumulation (the graphed backward's gradient buffers would alias across micro-batches)."""
    latents, cond, _ = batch
    sample = (latents.to(dtype), torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device),
              *(v.clone() for v in cond.values()))
    logger.info("capturing the UNet forward/backward as CUDA graphs (--no-cuda_graphs to turn off)")
    return torch.cuda.make_graphed_callables(Denoise(unet, dtype, cond, autocast), sample)


# --------------------------------------------------------------------------- a group's adapters

class OneAdapter:
    """A group of one subject: the plain adapter on the UNet (PEFT's layers for the baselines), DDP and
    CUDA graphs as accelerate and the GPU allow; its checkpoint holds the adapter itself."""

    def __init__(self, cfg, accelerator, unet, bare, params, data: TrainData, dtype, record: dict):
        for p in params:
            p.requires_grad_(True)  # a bank of an earlier group froze them
        self.cfg, self.accelerator, self.bare, self.params, self.record = cfg, accelerator, bare, params, record
        self.graphed = cfg.cuda_graphs and accelerator.device.type == "cuda" and accelerator.num_processes == 1 \
            and cfg.gradient_accumulation_steps == 1 and not cfg.gradient_checkpointing  # see enable_checkpointing
        if self.graphed:
            if cfg.channels_last:  # measured faster here, slower in a bank (docs/BENCHMARKS.md)
                bare.to(memory_format=torch.channels_last)
            self.denoise = graph_unet(bare, data.batch(0, 0), dtype, cfg.autocast)
        else:
            self.denoise = Denoise(unet, dtype, data.batch(0, 0)[1], cfg.autocast)

    def set_step(self, step: int) -> float:
        return set_step(self.bare, step)

    def clip(self, optimizer) -> None:
        # unscale this group's optimizer only (accelerator.clip_grad_norm_ would unscale every optimizer it
        # prepared: earlier groups' hold the same tensors, so fp16 gradients would be divided again per group)
        self.accelerator.unscale_gradients(optimizer=optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)

    def finite(self) -> list[bool]:
        return [bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all())]

    def save_weights(self, folder: Path) -> None:
        save_adapter(self.bare, folder, base_model=self.cfg.pretrained_model_name_or_path, extra=self.record)

    def load_weights(self, folder: Path) -> None:
        load_adapter_state_dict(self.bare, read_adapter(folder)[1])

    def stage(self, i: int) -> None:  # the adapter on the UNet is the subject's own
        pass

    def close(self) -> None:
        pass


class AdapterBank:
    """A group of several subjects: a bank of adapters, each sample routed through its subject's row;
    per-subject clipping; its checkpoint holds the whole bank, (S, ...) per tensor."""

    graphed = False

    def __init__(self, cfg, unet, bare, size: int, per: int, dtype, data: TrainData):
        self.cfg, self.bare = cfg, bare
        self.routing = add_bank(bare, size)
        self.params = bank_parameters(bare)
        self.routing.route(torch.arange(size, device=self.params[0].device).repeat_interleave(per))
        self.denoise = Denoise(unet, dtype, data.batch(0, 0)[1], cfg.autocast)
        self.u = None

    def set_step(self, step: int) -> float:
        u = self.cfg.u(step)
        if u != self.u:  # past the ramp: no kernel per step
            self.routing.set_coef(self.cfg.coef(step))
            self.u = u
        return u

    def clip(self, optimizer) -> None:
        clip_grad_norm_per_row_(self.params, self.cfg.max_grad_norm)  # (no fp16 in a bank: nothing to unscale)

    def finite(self) -> list[bool]:
        return torch.stack([torch.isfinite(p).flatten(1).all(1) for p in self.params]).all(0).tolist()

    def save_weights(self, folder: Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(folder / BANK_NAME) as part:
            save_file({k: v.detach().cpu().contiguous() for k, v in bank_state_dict(self.bare).items()}, str(part))

    def load_weights(self, folder: Path) -> None:
        from safetensors.torch import load_file

        bank, own = load_file(str(folder / BANK_NAME)), bank_state_dict(self.bare)
        if set(bank) != set(own) or any(tuple(bank[k].shape) != tuple(own[k].shape) for k in own):
            raise UserError(f"checkpoint {folder} does not fit this UNet's adapter bank (another base model?)")
        with torch.no_grad():
            for k, v in bank.items():
                own[k].copy_(v)

    def stage(self, i: int) -> None:
        row_to_staging(self.bare, i)  # the staging adapter then holds subject i's tensors: saved as one

    def close(self) -> None:
        self.routing.route(None)
        remove_bank(self.bare)


# --------------------------------------------------------------------------- the loop

class Stopped(Exception):
    """A stop request ended the run at a step boundary, with a checkpoint (not an error: exit status 0)."""


def train(cfg: TrainConfig, events=None) -> Path:
    """Run DreamBooth training as `cfg` says; returns cfg.output_dir (the adapter, or one folder per subject).
    `events`: an events.Events to report to (default: cfg.events as JSON lines, if given)."""
    with job("train", cfg.events) as own:
        events = events or own
        stop = StopRequest([cfg.stop_file, Path(cfg.output_dir) / STOP_NAME], since=time.time() - since_start())
        try:
            with stop.watching():
                return _train(cfg, events, stop)
        except Stopped:
            return Path(cfg.output_dir)


def _train(cfg: TrainConfig, events, stop: StopRequest) -> Path:
    family, members = plan_members(cfg)  # every input checked before any model loads
    if cfg.resolution is None:
        cfg.resolution = default_resolution(cfg.pretrained_model_name_or_path, cfg.revision, cfg.base_config)
    if cfg.resume_from_checkpoint not in (None, "latest") and len(members) > 1 and \
            read_state(Path(cfg.resume_from_checkpoint)).get("subjects") is None:
        raise UserError(f"{cfg.resume_from_checkpoint} is a 0.1 checkpoint of one unnamed subject: resume it in a "
                        "run of that one subject (--subject or --instance_data_dir), not with --subjects")
    size = min(cfg.subjects_per_batch or len(members), len(members))
    check_group_size(cfg, size)
    accelerator, dtype = make_accelerator(cfg)
    check_group_size(cfg, size, accelerator)
    if accelerator.is_main_process:
        stop.clear_files()  # a stop file of an earlier stop: this run goes on
    if cfg.overwrite and accelerator.is_main_process:  # --overwrite: start over, once every input checked
        shutil.rmtree(checkpoint_root(cfg.output_dir), ignore_errors=True)
    accelerator.wait_for_everyone()
    todo = [m for m in members if not check_not_another_run(cfg, m)]
    for m in members:
        if m not in todo:
            logger.info("%s: finished adapter in %s, skipped", m.name, m.output_dir)
    phases = {"inputs_checked": since_start()}  # seconds from process start, for the benchmarks
    base = Base.load(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant, dtype=dtype,
                     device=accelerator.device, vae=cfg.pretrained_vae_model_name_or_path,
                     base_config=cfg.base_config, family=family) if todo else None
    events.emit("started", config=cfg.to_dict(), family=base.family.name if base else None,
                subjects=[m.name for m in todo], skipped=[m.name for m in members if m not in todo])
    if not todo:
        return Path(cfg.output_dir)
    phases["models_loaded"] = since_start()
    datas = {m.name: TrainData(cfg, m, accelerator, base) for m in todo}
    phases["latents_cached"] = since_start()
    if cfg.validation_prompt is None:  # nothing needs the VAE or the text encoders again
        base.free_encoders()
    add_adapter(base.unet, cfg.adapter_config(), use_xformers=cfg.enable_xformers_memory_efficient_attention)
    if cfg.gradient_checkpointing:
        enable_checkpointing(base.unet)
    params = trainable_parameters(base.unet)
    init = {k: v.detach().clone() for k, v in adapter_state_dict(base.unet).items()}  # every subject's start
    unet = prepare_unet(accelerator, base.unet)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-singlora", config={k: str(v) for k, v in cfg.to_dict().items()})
        events.add(Tracker(accelerator))
        events.add(LogLines(logger))
    stats, t0 = [], time.time()
    try:
        for i in range(0, len(todo), size):
            group = todo[i:i + size]
            stats.append(train_group(cfg, accelerator, base, unet, params, init, group,
                                     [datas[m.name] for m in group], dtype, phases, events, stop))
            if len(todo) > size and accelerator.is_main_process:  # written: the next group reuses the step names
                remove_checkpoints(cfg.output_dir, [m.name for m in group])
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory training {len(group)} subject(s) in one batch: lower "
                        "--subjects_per_batch or add --gradient_checkpointing; finished subjects are saved, "
                        "run again with --resume_from_checkpoint latest to go on") from None
    except Stopped:
        accelerator.end_training()
        raise
    if cfg.subjects is not None and accelerator.is_main_process:
        write_json_atomic(Path(cfg.output_dir) / "train_stats.json", {
            "subjects": [m.name for m in members], "trained": [m.name for m in todo], "subjects_per_batch": size,
            "method": cfg.method, "max_train_steps": cfg.max_train_steps, "batches": stats,
            "loop_seconds": round(sum(s["loop_seconds"] for s in stats), 3), "wall_seconds": round(time.time() - t0, 3),
            **device_stats(), "mixed_precision": accelerator.mixed_precision})
    accelerator.end_training()
    events.emit("finished", outputs=[str(m.output_dir) for m in todo])
    return Path(cfg.output_dir)


def train_group(cfg, accelerator, base: Base, unet, params, init, group: list[Member], datas: list[TrainData], dtype,
                phases: dict, events, stop: StopRequest):
    """Train one group of subjects, all stepping together, and write each one's folder; returns its stats."""
    # 1. the group's adapters (every subject starts from the seed's initial adapter) and their optimizer
    bare, names, root = accelerator.unwrap_model(unet), [m.name for m in group], Path(cfg.output_dir)
    load_adapter_state_dict(bare, init)
    per = per_subject(cfg)
    adapters = OneAdapter(cfg, accelerator, unet, bare, params, datas[0], dtype, base.adapter_record()) \
        if len(group) == 1 \
        else AdapterBank(cfg, unet, bare, len(group), per, dtype, datas[0])
    optimizer, lr_scheduler = make_optimizer_and_schedule(cfg, accelerator, bare)

    # 2. resume: adapters, optimizer, schedule, step; the data of step t is a function of t
    step, histories = resume(cfg, group, adapters, optimizer, lr_scheduler, accelerator.num_processes)
    u, prior_w = adapters.set_step(step), cfg.prior_loss_weight if cfg.with_prior_preservation else None
    bar = Bar(tqdm(total=cfg.max_train_steps, initial=step, desc=f"training {', '.join(names)}"[:40],
                   disable=not accelerator.is_main_process))
    events.add(bar)
    loss_sum, n_sum = torch.zeros(len(group), device=accelerator.device), 0
    phases["adapters_ready"] = since_start()  # (CUDA graphs captured)

    # 3. the loop: sample, forward, backward, update; read the loss back only every log_every steps
    unet.train()
    first_step, loop_start, skipped = step, sync_time(accelerator.device), 0
    while step < cfg.max_train_steps:
        step_loss = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(unet):
                losses = group_losses(adapters.denoise, base, datas, step, micro, prior_w, dtype)
                accelerator.backward(losses.sum())
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    adapters.clip(optimizer)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss = step_loss + losses.detach() / cfg.gradient_accumulation_steps
        if accelerator.optimizer_step_was_skipped:  # fp16 overflow: no optimizer step, so t and u stay
            skipped += 1
            check_finite(names, [skipped < MAX_SKIPPED_STEPS] * len(names), step, root)
            continue
        skipped, loss_sum, step, n_sum = 0, loss_sum + step_loss, step + 1, n_sum + 1
        u = adapters.set_step(step)
        logged = step % cfg.log_every == 0 or step == cfg.max_train_steps
        if logged:
            means = (accelerator.reduce(loss_sum, reduction="mean") / n_sum).tolist()  # the host sync
            loss_sum.zero_()
            n_sum = 0
            check_finite(names, [math.isfinite(m) for m in means], step, root)
            for n, m in zip(names, means):
                histories[n].append([step, m])
            report_step(events, cfg, step, first_step, loop_start, dict(zip(names, means)),
                        lr_scheduler.get_last_lr()[0], u, accelerator.device)
        stopping = stop_requested(stop, accelerator, logged)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps or stopping:
            checkpoint(cfg, accelerator, group, adapters, optimizer, lr_scheduler, histories, step, events)
        if stopping:
            end_stopped(cfg, accelerator, group, adapters, bar, stop, step, events)
        if cfg.validation_prompt and step % cfg.validation_steps == 0 and accelerator.is_main_process:
            events.emit("validation", step=step, paths=validate(cfg, accelerator, base, bare, step))
            unet.train()
    bar.close()
    events.consumers.remove(bar)
    loop_seconds = sync_time(accelerator.device) - loop_start

    # 4. the result: each subject's adapter, model card, loss curve and stats (main process only)
    accelerator.wait_for_everyone()
    phases["loop_done"] = since_start()
    stats = {"subjects": names, "steps_run": step - first_step, "loop_seconds": round(loop_seconds, 3),
             "it_per_s": round((step - first_step) / loop_seconds, 3) if loop_seconds > 0 else None,
             "samples_per_s": round((step - first_step) * len(group) * per * cfg.gradient_accumulation_steps
                                    * accelerator.num_processes / loop_seconds, 2) if loop_seconds > 0 else None}
    if accelerator.is_main_process:
        with reported(f"the results of {', '.join(names)}", root, names):
            write_results(cfg, base, accelerator, group, adapters, histories, step, init, {**stats, "phases": phases},
                          events)
    adapters.close()
    return stats


def checkpoint(cfg, accelerator, group: list[Member], adapters, optimizer, lr_scheduler, histories, step: int,
               events) -> None:
    """A resumable checkpoint of the group at `step` (the main process writes it) and its event."""
    names, root = [m.name for m in group], Path(cfg.output_dir)
    check_finite(names, adapters.finite(), step, root)
    if accelerator.is_main_process:
        with reported(f"checkpoint-{step}", root, names):
            saved = save_checkpoint(root, step, adapters.save_weights, optimizer, lr_scheduler, {
                "subjects": names, "histories": histories, "adapter": cfg.adapter_config().to_dict(),
                "runs": {m.name: run_of(cfg, m) for m in group}, "config": cfg.shared_dict()},
                cfg.checkpoints_total_limit)
        events.emit("checkpoint", step=step, path=saved, subjects=names)


def end_stopped(cfg, accelerator, group: list[Member], adapters, bar, stop: StopRequest, step: int, events) -> None:
    """End a run that a stop request stopped at `step`, its checkpoint written: the event, and Stopped."""
    accelerator.wait_for_everyone()
    found = list_checkpoints(checkpoint_root(cfg.output_dir), [m.name for m in group])
    events.emit("stopped", step=step, checkpoint=str(found[-1]) if found else None, reason=stop.reason(),
                resume="run the same command again to resume from this checkpoint")
    if accelerator.is_main_process:
        stop.consume()
    bar.close()
    adapters.close()
    raise Stopped


def report_step(events, cfg, step: int, first_step: int, loop_start: float, losses: dict, lr: float, u: float,
                device) -> None:
    """The `step` event: each subject's mean loss over the log window, lr, u, speed and time left."""
    elapsed = sync_time(device) - loop_start
    rate = (step - first_step) / elapsed if elapsed > 0 else None
    events.emit("step", step=step, total=cfg.max_train_steps, loss=losses, lr=lr, u=u,
                it_per_s=round(rate, 3) if rate else None,
                eta_s=round((cfg.max_train_steps - step) / rate, 1) if rate else None)


def stop_requested(stop: StopRequest, accelerator, logged: bool) -> bool:
    """Whether to stop after this step. One process asks its own signals and files at every step; several agree
    at the logged steps (one all-reduce there), so that every process stops at the same step."""
    if accelerator.num_processes == 1:
        return stop.requested()
    if not logged:
        return False
    flag = torch.tensor([1.0 if stop.requested() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def resume(cfg: TrainConfig, group: list[Member], adapters, optimizer, lr_scheduler, processes: int):
    """Adapters, optimizer and schedule from --resume_from_checkpoint; returns (step, loss histories by subject),
    (0, empty) for a fresh start. A checkpoint of another run (other photos or settings; 0.1 checkpoints record
    none) is refused."""
    names = [m.name for m in group]
    found = find_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint, names, cfg.max_train_steps) \
        if cfg.resume_from_checkpoint else None
    runs = read_state(found).get("runs") if found is not None else None
    for m in group if runs is not None else ():
        if diff := run_differs(cfg, m, runs.get(m.name)):
            raise UserError(f"{found} is a checkpoint of another run of {m.name} ({diff} differs): give another "
                            "--output_dir, or --overwrite to start over")
    step, histories = load_checkpoint(found, names, cfg.adapter_config().to_dict(), adapters.load_weights,
                                      optimizer, lr_scheduler) if found is not None else (0, {})
    # accelerate steps a prepared schedule once per process and optimizer step, so it stands at step x processes:
    # a checkpoint written by another number of processes goes on at this run's count (the same learning rate)
    lr_scheduler.scheduler.last_epoch = step * processes
    logger.info("%s: %s, steps %d -> %d", ", ".join(names), cfg.method, step, cfg.max_train_steps)
    return step, {n: histories.get(n, []) for n in names}


def write_results(cfg, base: Base, accelerator, group: list[Member], adapters, histories, step, init, stats,
                  events) -> None:
    """Each subject's folder: adapter, loss curve, model card, train_stats.json (each file atomically)."""
    n_params, phases = sum(t.numel() for t in init.values()), stats.pop("phases")
    for i, m in enumerate(group):
        adapters.stage(i)
        set_step(adapters.bare, step)
        save_adapter(adapters.bare, m.output_dir, base_model=cfg.pretrained_model_name_or_path,
                     extra={"run": run_of(cfg, m), **base.adapter_record(), "holdout": m.holdout})
        plot_loss(histories[m.name], m.output_dir / "loss_curve.png", m.name)
        write_text_atomic(m.output_dir / "README.md", model_card(cfg, base.family, m, step, n_params,
                                                                 stats["loop_seconds"]))
        write_json_atomic(m.output_dir / "train_stats.json", {
            **stats, **device_stats(), "cuda_graphs": adapters.graphed, "mixed_precision": accelerator.mixed_precision,
            "channels_last": adapters.graphed and cfg.channels_last,
            "autocast": cfg.autocast and accelerator.mixed_precision != "no", "trainable_parameters": n_params,
            "num_processes": accelerator.num_processes, "samples_per_unet_call": len(group) * per_subject(cfg),
            "phases_seconds_from_process_start": {**phases, "results_written": since_start()},
            "loss_history": histories[m.name]})
        events.emit("saved", subject=m.name, path=m.output_dir)
    logger.info("adapter(s) of %s saved", ", ".join(m.name for m in group))


def per_subject(cfg: TrainConfig) -> int:
    """Samples of one subject in one UNet call: its instance images, and as many class images with prior
    preservation."""
    return cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)


def make_accelerator(cfg: TrainConfig):
    """accelerate decides devices and processes; returns it and the frozen models' dtype."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[AutocastKwargs(enabled=cfg.autocast)])  # accelerator.autocast() (validation): as Denoise
    set_seed(cfg.seed)  # the same seed before the same model loads gives the same initial adapter
    use_cpu_threads(accelerator.device)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}  # "no": torch's default dtype (fp32; the tests' fp64)
    return accelerator, half.get(accelerator.mixed_precision, torch.get_default_dtype())


def prepare_unet(accelerator, unet):
    """The UNet prepared by accelerate (DDP over several processes), without the autocast and fp32-output
    wrapper that prepare puts on its forward: Denoise alone decides autocast (--autocast), and the UNet's
    outputs stay in its dtype, as a sampling pipeline's scheduler needs them (validation)."""
    unet = accelerator.prepare(unet)
    accelerator.unwrap_model(unet, keep_fp32_wrapper=False)  # in place: the module's own forward is back
    return unet


def make_optimizer_and_schedule(cfg: TrainConfig, accelerator, unet):
    """The optimizer over the UNet's trainable tensors and its learning-rate schedule, prepared by accelerate."""
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(cfg, unet, accelerator.device, fp16=accelerator.mixed_precision == "fp16")
    n = accelerator.num_processes  # accelerate steps a prepared schedule once per process
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * n,
                                 num_training_steps=cfg.max_train_steps * n)
    return accelerator.prepare(optimizer, lr_scheduler)


def make_optimizer(cfg: TrainConfig, unet, device, fp16: bool = False):
    """AdamW (fused on CUDA, or bitsandbytes' 8-bit) over the UNet's trainable tensors; LoRA+ through PEFT."""
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
        if device.type == "cuda" and cfg.fused_adam and not fp16:
            kw["fused"] = True  # one kernel for all adapter tensors (with fp16 the fused kernel skips an
            # overflowed step inside itself, where accelerate cannot see it: t, u and the schedule would move on)
    if cfg.method == "loraplus":  # B's tensors (a bank's are named *_lora_B too) get lr x ratio
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(unet, opt_cls, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                         loraplus_weight_decay=cfg.adam_weight_decay, **kw)
    return opt_cls(trainable_parameters(unet), **kw)


@contextmanager
def reported(what: str, root: Path, names: list[str]):
    """A failed write (full disk, no permission) inside the block becomes one line that names what was being
    written, what is intact and how to go on."""
    try:
        yield
    except (WriteError, OSError) as e:
        err = e if isinstance(e, WriteError) else write_error(getattr(e, "filename", None) or root, e)
        found = list_checkpoints(checkpoint_root(root), names)
        keep = f"{found[-1].name} is intact" if found else "no checkpoint was complete before it"
        raise UserError(f"{err.what()} while writing {what} ({err.path}); {keep} and nothing written before "
                        "was lost; free space (or fix the permission) and run the same command with "
                        "--resume_from_checkpoint latest") from None


def check_finite(names: list[str], ok: list[bool], step: int, root: Path) -> None:
    """Stop with a clear message if a subject's loss or adapter is not finite."""
    bad = [n for n, good in zip(names, ok) if not good]
    if not bad:
        return
    found = list_checkpoints(checkpoint_root(root), names)
    keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved before it"
    raise UserError(f"loss of {', '.join(bad)} became non-finite by step {step}; training stopped and {keep}. "
                    "Lower --learning_rate or use --mixed_precision bf16 instead of fp16")


def sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def since_start() -> float:
    """Seconds since this process started (interpreter start and imports included). psutil's create_time adds
    the boot time in whole seconds, so it can be up to a second off; on Linux the kernel's clock ticks since
    boot (/proc, 10 ms steps) are used instead, unless they disagree with it by more than that (a container
    whose /proc/uptime is its own)."""
    import psutil

    coarse = time.time() - psutil.Process().create_time()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            fine = float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return round(coarse, 3)
    return round(fine if abs(fine - coarse) <= 1.5 else coarse, 3)


def device_stats() -> dict:
    cuda = torch.cuda.is_available()
    return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


# --------------------------------------------------------------------------- what a person sees

@torch.no_grad()
def validate(cfg: TrainConfig, accelerator, base: Base, unet, step: int) -> list[str]:
    """Render each --validation_prompt with the current adapter through the renderer (image k with seed + k) into
    validation/step-<step>/ (k.png for one prompt, <prompt index>-k.png for several), a grid beside it (a row per
    prompt), and tensorboard images; returns the written paths."""
    import numpy as np
    from PIL import Image

    from .generate import Job, render

    folder = Path(cfg.output_dir) / "validation"
    gen_cfg = render_config(cfg, folder, cfg.num_validation_images)
    prompts, n = cfg.validation_prompt, cfg.num_validation_images
    name = (lambda i, k: f"{k}.png") if len(prompts) == 1 else (lambda i, k: f"{i}-{k}.png")
    jobs = [Job(p, cfg.seed + k, folder / f"step-{step:05d}" / name(i, k), {})
            for i, p in enumerate(prompts) for k in range(n)]
    unet.eval()
    with accelerator.autocast():
        render(base.pipeline(unet, scheduler="dpm++"), gen_cfg, jobs, show=False)
    images = [Image.open(j.path).convert("RGB") for j in jobs]
    grid = image_grid(images, cols=n if len(prompts) > 1 else 4, captions=[f"seed {j.seed}" for j in jobs],
                      title=f"step {step}" + (f": {prompts[0]}" if len(prompts) == 1 else ""),
                      row_titles=prompts if len(prompts) > 1 else None)
    with atomic_path(folder / f"step-{step:05d}.png") as tmp:
        grid.save(tmp, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return [str(folder / f"step-{step:05d}.png"), *(str(j.path) for j in jobs)]


# --------------------------------------------------------------------------- CLI

@cli_entry
def main(argv=None, own_process: bool = False):
    """The command. own_process: this process runs nothing but it (`python -m`, `accelerate launch`, the
    console script), so --fast_exit may end it once the results are written."""
    cfg = from_args(TrainConfig, train_parser().parse_args(argv))
    train(cfg)
    if own_process and cfg.fast_exit and not observed():
        end_process()


if __name__ == "__main__":
    main(own_process=True)
