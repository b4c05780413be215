"""The configs: one dataclass each for the adapter (adapter_config.json), training and generation,
shared by the CLI and the Python API.

Every field's help text lives in its metadata; `add_arguments` turns a config dataclass into
argparse flags and `from_args` back, so the CLI and the API can never drift apart. Nothing here
imports torch, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib.util
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import UserError
from .prompts import IDENTIFIER, get_subject, resolve_subjects

METHODS = ("singlora", "lora", "loraplus", "dora")
#: The two files of a saved adapter
WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
#: How SingLoRA's A is initialised (singlora.init_A_): "width" (fan-in = the layer's input width) or "rank".
INITS = ("width", "rank")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: one precision vocabulary for every command ("no" and "fp32" are the same: full precision)
PRECISIONS = ("no", "fp32", "fp16", "bf16")


def _opt(default, text: str, **extra):
    """A config field: its default, its --help text and argparse extras (choices, aliases, action)."""
    return field(default=default, metadata={"help": text, **extra})


@dataclass
class SingLoRAConfig:
    """Which adapter to place on the UNet's attention projections, and how."""

    method: str = _opt("singlora", f"adapter: {', '.join(METHODS)} (lora/loraplus/dora through PEFT)", choices=METHODS)
    rank: int = _opt(8, "adapter rank r")
    alpha: Optional[float] = _opt(
        None, "scale numerator: delta W is multiplied by alpha / r (default: alpha = rank, scale 1)")
    ramp_steps: int = _opt(
        40, "SingLoRA ramp T: u(t) = min(t / T, 1) over optimizer steps; 0 = no ramp. Default 40 = 10%% of the default "
        "400 steps")
    init: str = _opt(
        "width", "SingLoRA init of A: 'width' (fan-in = layer width, entries ~1/d as PEFT's LoRA A) or 'rank' (fan-in "
        "= r, the public implementations' choice)", choices=INITS)
    target_modules: Tuple[str, ...] = _opt(
        ("to_q", "to_k"), f"attention projections to adapt, from {', '.join(TARGETS)}")
    loraplus_lr_ratio: float = _opt(16.0, "LoRA+ only: B's learning rate = learning_rate x this ratio")

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"rank must be a positive integer, got {self.rank!r}")
        if self.ramp_steps < 0:
            raise UserError(f"ramp_steps must be >= 0 (0 = no ramp), got {self.ramp_steps}")
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if not self.target_modules or any(t not in TARGETS for t in self.target_modules):
            raise UserError(f"bad target_modules {list(self.target_modules)}; choose from {', '.join(TARGETS)}")
        if self.loraplus_lr_ratio <= 0:
            raise UserError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")

    def u(self, step: int) -> float:
        """u(t) after `step` optimizer steps: SingLoRA's ramp min(t / T, 1), 1 for the baselines (the one rule)."""
        from .singlora import ramp

        return ramp(step, self.ramp_steps) if self.method == "singlora" else 1.0

    def coef(self, step: int, strength: float = 1.0) -> float:
        """(alpha / r) * u(step) * strength: the factor of every adapter term at `step` (the one rule, for the
        layers, the bank, generation and export alike)."""
        return self.alpha / self.rank * self.u(step) * strength

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(SingLoRAConfig)} | {
            "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "SingLoRAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- CLI <-> dataclass

def add_arguments(parser: argparse.ArgumentParser, cls, exclude=()) -> None:
    """Add one --flag per field of the dataclass `cls` (but `exclude`), typed and documented from the field."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Union and len(args) == 1:  # Optional[X]: a flag of type X
            tp = args[0]
        kw = {"default": f.default if f.default is not MISSING else f.default_factory(),
              **{k: v for k, v in f.metadata.items() if k != "aliases"}}  # help, choices, action
        if "action" in kw:  # e.g. "append": a repeatable flag
            kw.update(type=typing.get_args(tp)[0], default=None)
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list):
            kw.update(nargs="+", type=typing.get_args(tp)[0])
        else:
            kw["type"] = tp
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kw)


def _digest(adapter: Path) -> str | None:
    """sha256 (16 hex digits) of an adapter folder's weights file; None if there is none."""
    weights = adapter if adapter.suffix == ".safetensors" else adapter / WEIGHTS_NAME
    try:
        st = weights.stat()
    except OSError:
        return None
    return _digest_of(str(weights), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is read again
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every flag's default (unless its help says it)."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "").lower() else super()._get_help_string(action)


def command_parser(command: str, description: str, cls=None) -> argparse.ArgumentParser:
    """The parser of `dreambooth-singlora <command>`; with `cls`, one flag per field of that dataclass."""
    parser = argparse.ArgumentParser(prog=f"dreambooth-singlora {command}", description=description,
                                     formatter_class=HelpFormatter)
    if cls is not None:
        add_arguments(parser, cls)
    return parser


def module_doc(module: str) -> str:
    """The docstring of `module`, read from its source without importing it (the heavy modules import torch)."""
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def train_parser() -> argparse.ArgumentParser:
    return command_parser("train", module_doc("dreambooth_singlora.train_dreambooth"), TrainConfig)


def generate_parser() -> argparse.ArgumentParser:
    return command_parser("generate", module_doc("dreambooth_singlora.generate"), GenerateConfig)


def add_many_arguments(parser, output_flag: str = "--output_dir") -> None:
    """The flags of a many-subject render (generate-many, eval render): every generation flag of `generate`."""
    other = {"--output_dir": "--output", "--output": "--output_dir"}[output_flag]
    parser.add_argument("--adapters", required=True,
                        help="folder of per-subject adapter folders (<adapters>/<subject>/)")
    parser.add_argument(output_flag, other, required=True, dest="output_dir",
                        help="images folder (<output>/<subject>/<slug>/<k>.png)")
    parser.add_argument("--subjects", nargs="+", default=None, help="subjects to render (default: all 30)")
    parser.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts of each subject")
    parser.add_argument("--no_resume", action="store_true", dest="overwrite", help="the earlier name of --overwrite")
    add_arguments(parser, GenerateConfig, exclude=("adapter", "prompt", "prompts_file", "subject", "output_dir",
                                                   "skip_existing", "merge", "events"))


def generate_many_parser() -> argparse.ArgumentParser:
    parser = command_parser("generate-many", module_doc("dreambooth_singlora.generate"))
    add_many_arguments(parser)
    parser.add_argument("--events", default=None, help=field_help(GenerateConfig, "events"))
    return parser


def field_help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def many_config(args) -> "GenerateConfig":
    """The GenerateConfig of a many-subject render's parsed flags (resumes unless --overwrite; never merged)."""
    args.adapter, args.merge = args.adapters, False
    return from_args(GenerateConfig, args)


def from_args(cls, ns: argparse.Namespace):
    """Build the dataclass `cls` from the parsed flags (fields without a flag keep their default)."""
    given = {f.name: getattr(ns, f.name, None) for f in fields(cls)}
    return cls(**{k: v for k, v in given.items() if v is not None})  # None: the field's own default


# --------------------------------------------------------------------------- training

BASE_CONFIG_HELP = ("with a single-file checkpoint as the base model: a diffusers folder (or hub id) of the same "
                    "family, whose configs, tokenizers and scheduler go with the file's weights")
NEEDS_DATASET = "--dataset_dir (the DreamBooth dataset folder, <dataset_dir>/<subject>/*.jpg)"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class TrainConfig(SingLoRAConfig):
    """Everything a DreamBooth run needs. Flag names follow diffusers' train_dreambooth_lora.py."""

    pretrained_model_name_or_path: Optional[str] = _opt(
        None, "base model: a hub id (stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, "
        "stabilityai/stable-diffusion-xl-base-1.0) or a local diffusers folder; its family is read from its "
        "model_index.json. Or one original-layout .safetensors file, with --base_config")
    base_config: Optional[str] = _opt(None, BASE_CONFIG_HELP)
    revision: Optional[str] = _opt(None, "hub revision of the base model")
    variant: Optional[str] = _opt(None, "weights variant, e.g. fp16")
    pretrained_vae_model_name_or_path: Optional[str] = _opt(
        None, "another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16 (SDXL's own VAE is "
        "otherwise run in fp32 for encoding)")
    subject: Optional[str] = _opt(
        None, "a DreamBooth subject (e.g. dog): fills instance_data_dir, instance_prompt and class_prompt from "
        "--dataset_dir and the subjects table; the adapter goes to --output_dir")
    subjects: Optional[List[str]] = _opt(
        None, "several DreamBooth subjects, or 'all' for the 30: one adapter each, in <output_dir>/<subject>/, trained "
        "together in batches of --subjects_per_batch")
    subjects_per_batch: Optional[int] = _opt(
        None, "with --subjects: subjects that share one UNet batch through an adapter bank (default: all; 1 = one "
        "subject at a time, each with every single-subject feature: DDP, CUDA graphs, fp16, 8-bit Adam, DoRA)")
    dataset_dir: Optional[str] = _opt(
        None, "the DreamBooth dataset folder (<dataset_dir>/<subject>/*.jpg), used with --subject / --subjects")
    identifier: str = _opt(IDENTIFIER, "the rare token that names the subject")
    instance_data_dir: Optional[str] = _opt(None, "folder of the subject's photos")
    instance_prompt: Optional[str] = _opt(None, "prompt of the subject's photos, e.g. 'a photo of sks dog'")
    class_data_dir: Optional[str] = _opt(
        None, "folder of class images for prior preservation (generated there if too few; default "
        "<output_dir>/class_images)")
    class_prompt: Optional[str] = _opt(None, "prompt of the class, e.g. 'a photo of dog'")
    with_prior_preservation: bool = _opt(False, "add the prior-preservation loss")
    prior_loss_weight: float = _opt(1.0, "weight of the prior-preservation loss")
    num_class_images: int = _opt(100, "class images for prior preservation")
    sample_batch_size: int = _opt(4, "batch size when generating class images")
    output_dir: str = _opt(
        "outputs/dreambooth-singlora", "where the adapter, checkpoints, logs and samples go", aliases=("--output",))
    seed: int = _opt(0, "seed: same seed, same run (on the same hardware)")
    resolution: Optional[int] = _opt(
        None, "training resolution in pixels, a multiple of 8 (default: the base model's: 512 for SD 1.x and 2.x-base, "
        "768 for SD 2.x 768-v, 1024 for SDXL)")
    holdout: int = _opt(
        0, "keep this many of each subject's photos out of training (chosen by --seed, recorded in the adapter's "
        "config), for scoring against photos the adapter never saw")
    center_crop: bool = _opt(
        False, "center-crop the photos; otherwise random crops (taken from cached latents, 8-pixel steps)")
    random_flip: bool = _opt(False, "random horizontal flips (flipped latents cached too)")
    train_batch_size: int = _opt(1, "instance images per step and process")
    max_train_steps: int = _opt(400, "optimizer steps")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _opt(False, "trade compute for UNet activation memory")
    learning_rate: float = _opt(1e-4, "adapter learning rate")
    lr_scheduler: str = _opt("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "warm-up steps of the schedule")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = _opt(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    mixed_precision: Optional[str] = _opt(
        None, "no (= fp32), fp16 or bf16 (default: accelerate's config); frozen models run in it, the adapter stays "
        "fp32", choices=PRECISIONS, aliases=("--dtype",))
    allow_tf32: bool = _opt(False, "allow TF32 matmuls on Ampere+ GPUs")
    enable_xformers_memory_efficient_attention: bool = _opt(False, "xformers attention (needs the xformers extra)")
    checkpointing_steps: int = _opt(100, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: Optional[int] = _opt(
        2, "keep the newest N checkpoints (oldest removed first); 0 keeps them all")
    resume_from_checkpoint: Optional[str] = _opt(
        "latest", "a checkpoint folder, or 'latest' (the newest complete one in <output_dir>/checkpoints; starts fresh "
        "if there is none; subjects whose adapter is already finished are skipped)")
    overwrite: bool = _opt(
        False, "start over: ignore and delete the checkpoints in --output_dir and train every subject again")
    validation_prompt: Optional[List[str]] = _opt(
        None, "prompt(s) of the validation image grids, a row of --num_validation_images each (default: none)")
    num_validation_images: int = _opt(4, "images per validation")
    validation_steps: int = _opt(100, "validate every N steps")
    fused_adam: bool = _opt(True, "fused AdamW kernel on CUDA (one launch for all adapter tensors)")
    cuda_graphs: bool = _opt(
        True, "on one GPU without gradient accumulation, replay the UNet's forward/backward as CUDA graphs (the same "
        "kernels, no launch overhead)")
    channels_last: bool = _opt(
        True, "with CUDA graphs, the UNet in channels-last memory format: cuDNN's convolutions skip a layout transpose "
        "each (19.1 against 23.7 ms a step on an H200); a bank of several subjects stays contiguous, where "
        "channels-last measured slower")
    autocast: bool = _opt(
        False, "run the UNet's training forward under torch.autocast, which computes its norms in fp32 and casts "
        "around each one; off, the frozen UNet runs in its --mixed_precision dtype as loaded (norms keep fp32 "
        "statistics inside their kernels) and the adapters cast their fp32 tensors themselves")
    report_to: str = _opt("tensorboard", "tracker for accelerate ('tensorboard', 'none')")
    fast_exit: bool = _opt(
        True, "run as a command (python -m, accelerate launch, dreambooth-singlora train), end the process as soon as "
        "every result is written, without the interpreter's and CUDA's teardown (1.3-1.5 s on an H200); never under "
        "a profiler, tracer or debugger")
    log_every: int = _opt(10, "read the loss back from the GPU (progress bar, logs, non-finite check) every N steps")
    events: Optional[str] = _opt(
        None, "write every event of the run (started, step, checkpoint, validation, saved, finished / failed / "
        "stopped) to this file as JSON lines, one flushed line each, for another process to follow")
    stop_file: Optional[str] = _opt(
        None, "stop at the next step with a checkpoint when this file appears (as when a file named STOP appears in "
        "--output_dir, or on SIGINT / SIGTERM); the same command resumes")

    def __post_init__(self):
        super().__post_init__()
        if self.subjects is not None:
            given = [f"--{n}" for n in ("subject", "instance_data_dir", "instance_prompt", "class_prompt",
                                        "class_data_dir", "validation_prompt") if getattr(self, n) is not None]
            if given:
                raise UserError(f"{given[0]} is a single-subject flag: with --subjects each subject's photos, "
                                "prompts and output folder come from --dataset_dir and --output_dir/<subject>")
            if not self.subjects:
                raise UserError("--subjects takes 'all' alone, or a list of subject names")
            self.subjects = resolve_subjects(self.subjects)
            dups = sorted({n for n in self.subjects if self.subjects.count(n) > 1})
            if dups:
                raise UserError(f"subject(s) listed twice in --subjects: {', '.join(dups)}")
            if not self.dataset_dir:
                raise UserError(f"--subjects needs {NEEDS_DATASET}")
        elif self.subjects_per_batch is not None:
            raise UserError("--subjects_per_batch goes with --subjects")
        if self.subjects_per_batch is not None and self.subjects_per_batch < 1:
            raise UserError(f"--subjects_per_batch must be >= 1, got {self.subjects_per_batch}")
        if self.subject is not None:
            subj = get_subject(self.subject)
            if not self.dataset_dir and not self.instance_data_dir:
                raise UserError(f"--subject needs {NEEDS_DATASET}")
            self.instance_data_dir = self.instance_data_dir or str(Path(self.dataset_dir) / subj.name)
            self.instance_prompt = self.instance_prompt or subj.instance_prompt(self.identifier)
            self.class_prompt = self.class_prompt or subj.class_prompt()
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required (a hub id or a local diffusers folder)")
        if self.subjects is None:
            if not self.instance_data_dir:
                raise UserError("give --instance_data_dir (and --instance_prompt), --subject or --subjects with "
                                "--dataset_dir")
            if not self.instance_prompt:
                raise UserError("--instance_prompt is required with --instance_data_dir, e.g. 'a photo of sks dog'")
            if self.with_prior_preservation and not self.class_prompt:
                raise UserError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog') or --subject")
            if self.with_prior_preservation and not self.class_data_dir:
                self.class_data_dir = str(Path(self.output_dir) / "class_images")
        if isinstance(self.validation_prompt, str):  # the Python API's single prompt
            self.validation_prompt = [self.validation_prompt]
        self.validation_prompt = list(self.validation_prompt) if self.validation_prompt else None
        if self.mixed_precision == "fp32":
            self.mixed_precision = "no"  # accelerate's word for it
        if self.holdout < 0:
            raise UserError(f"--holdout must be >= 0, got {self.holdout}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                     "validation_steps", "num_validation_images", "sample_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 0:
            raise UserError("--checkpoints_total_limit must be >= 1, or 0 to keep every checkpoint")
        self.checkpoints_total_limit = self.checkpoints_total_limit or None  # 0: keep them all
        if self.overwrite:
            if self.resume_from_checkpoint not in (None, "latest"):
                raise UserError("--overwrite starts over; it cannot go with --resume_from_checkpoint <folder>")
            self.resume_from_checkpoint = None

    def adapter_config(self) -> SingLoRAConfig:
        return SingLoRAConfig(**SingLoRAConfig.to_dict(self))

    def to_dict(self) -> dict:
        return asdict(self) | {"target_modules": list(self.target_modules)}

    def shared_dict(self) -> dict:
        """The settings every subject of a run shares (what a checkpoint records as the run's config)."""
        return {k: v for k, v in self.to_dict().items() if k not in PER_SUBJECT}


#: TrainConfig fields that belong to one subject; a run of several subjects shares every other one
PER_SUBJECT = ("subject", "subjects", "instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir",
               "output_dir", "validation_prompt")


# --------------------------------------------------------------------------- generation

SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm++": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "lms": "LMSDiscreteScheduler", "unipc": "UniPCMultistepScheduler", "ddpm": "DDPMScheduler"}


@dataclass
class GenerateConfig:
    """What to render, from which adapter, how. Shared by the CLI and `generate_images`."""

    adapter: Optional[str] = _opt(
        None, "adapter folder (adapter_model.safetensors + adapter_config.json); none = the base model alone")
    pretrained_model_name_or_path: Optional[str] = _opt(
        None, "base model (default: the one named in the adapter's config)")
    base_config: Optional[str] = _opt(None, BASE_CONFIG_HELP + " (default: the adapter's, for its own base)")
    prompt: List[str] = field(default_factory=list, metadata={"help": "a prompt (repeat the flag for more)",
                                                              "action": "append"})
    prompts_file: Optional[str] = _opt(None, "a text file, one prompt per line")
    subject: Optional[str] = _opt(None, "the 25 DreamBooth prompts of this subject")
    identifier: str = _opt(IDENTIFIER, "the subject's identifier token, for --subject")
    num_images_per_prompt: int = _opt(4, "images per prompt")
    seed: int = _opt(0, "image k of every prompt uses seed + k")
    num_inference_steps: int = _opt(50, "denoising steps")
    guidance_scale: float = _opt(7.5, "classifier-free guidance scale")
    scheduler: str = _opt("ddim", "sampler", choices=tuple(SCHEDULERS))
    batch_size: int = _opt(4, "images per UNet batch (does not change the images)")
    adapter_scale: float = _opt(1.0, "strength of the adapter (1 = as trained)")
    merge: bool = _opt(True, "merge the adapter into the weights (same images, faster)")
    height: Optional[int] = _opt(None, "image height (default: the model's)")
    width: Optional[int] = _opt(None, "image width (default: the model's)")
    dtype: Optional[str] = _opt(
        None, "fp32 (= no), fp16 or bf16 (default: fp16 on a GPU, fp32 on the CPU)", choices=PRECISIONS,
        aliases=("--mixed_precision",))
    output_dir: Optional[str] = _opt(
        None, "where the PNGs, index.json and contact sheet go (default: a new outputs/samples/<date-time>/ per run)",
        aliases=("--output",))
    skip_existing: bool = _opt(
        True, "keep images already in output_dir (resume); --no-skip_existing or --overwrite renders them again")
    overwrite: bool = _opt(False, "render every image again, replacing those there")
    enable_xformers_memory_efficient_attention: bool = _opt(False, "xformers attention")
    events: Optional[str] = _opt(None, "write the job's events (started, progress, finished / failed) to this file "
                                 "as JSON lines")
    compile: bool = _opt(
        False, "torch.compile the UNet and the VAE decoder: one to two minutes to compile, then faster sampling (H100: "
        "UNet 1.4x, VAE decode 2.2x); worth it for hundreds of images")

    def __post_init__(self):
        for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.adapter and not self.pretrained_model_name_or_path:
            raise UserError("give --adapter (a trained adapter folder) or --pretrained_model_name_or_path")
        if self.overwrite:
            self.skip_existing = False
        if self.output_dir is None:
            self.output_dir = f"outputs/samples/{time.strftime('%Y%m%d-%H%M%S')}"
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise UserError(f"--{name} must be a positive multiple of 8 (the VAE works in 8-pixel blocks), "
                                f"got {v}; e.g. {max(8, round(v / 8) * 8)}")

    def settings(self) -> dict:
        """What decides the images (recorded in each PNG and in index.json), the adapter's weights included
        (a digest of the file: an adapter trained again under the same path renders again)."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("prompt", "prompts_file", "output_dir", "skip_existing", "overwrite", "events")}
        if not self.base_config:
            out.pop("base_config")  # the settings of images rendered before the flag existed stay the same
        if self.adapter:
            out["adapter_weights"] = _digest(Path(self.adapter))
        return out

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
