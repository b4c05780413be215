"""The base model: the one module that knows a model family.

    family = detect_family("stabilityai/stable-diffusion-xl-base-1.0")    # reads model_index.json only
    base = Base.load(src, dtype=torch.bfloat16, device="cuda")            # the frozen parts
    cond = base.encode_prompt("a photo of sks dog")    # {"encoder_hidden_states": (1, 77, D), ...} batch-first
    mean, std = base.latent_dist(images)                # the VAE's latent distribution, (B, 4, h, w) each
    latents = base.scale_latents(mean + std * noise)
    pred = unet(noisy, t, **base.unet_kwargs(cond))     # a family with extra conditioning adds keys, not call sites
    loss = mse(pred, base.target(latents, noise, t))    # epsilon or v, from the scheduler
    pipe = base.pipeline(unet, scheduler="dpm++")        # class images, validation and `generate`

The trainer, the bank, validation, class images and `generate` receive a `Base` and import no diffusers or
transformers model or pipeline class. A new family is one `Family` here and a tiny pipeline for the tests.

A base model is a diffusers folder, a hub id, or one original-layout .safetensors file (how most SD 2.x and SDXL
fine-tunes are shared) with `base_config`, a diffusers folder (or hub id) of the same family: the family, the
default resolution, the tokenizers and the scheduler come from it, the weights from the file (diffusers'
from_single_file converts them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SCHEDULERS
from .errors import UserError, first_line
from .fileio import check_base_model

logger = logging.getLogger(__name__)

#: the UNet call's conditioning keys that go into `added_cond_kwargs` (SDXL's micro-conditioning)
ADDED_COND = ("text_embeds", "time_ids")

@dataclass(frozen=True)
class Family:
    """What differs between model families: the pipeline class, the text encoders (subfolders) and how the UNet
    reads them. (The export's key layout per family: export.export_layout.)"""
    name: str
    label: str
    pipeline: str
    text_encoders: tuple
    pooled: bool = False  # the last text encoder's pooled projection conditions the UNet (text_embeds)
    penultimate: bool = False  # the UNet reads the text encoders' penultimate hidden states
    upcast_vae: bool = False  # the VAE overflows in fp16: encode in fp32
    example: str = ""  # the family's best-known base on the hub, for messages


FAMILIES = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", ("text_encoder",),
                  example="stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd2": Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", ("text_encoder",),
                  example="stabilityai/stable-diffusion-2-1"),
    "sdxl": Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                   pooled=True, penultimate=True, upcast_vae=True, example="stabilityai/stable-diffusion-xl-base-1.0"),
}
SUPPORTED = {"StableDiffusionPipeline": "Stable Diffusion 1.x and 2.x",
             "StableDiffusionXLPipeline": "Stable Diffusion XL"}


def supported_line() -> str:
    return "; ".join(f"{cls} ({what})" for cls, what in SUPPORTED.items())


def _read_json(src: str, name: str, revision: str | None) -> dict:
    """`name` (e.g. model_index.json, unet/config.json) of a local folder or a hub snapshot, without weights."""
    path = Path(src).expanduser()
    if path.is_dir():
        file = path / name
        if not file.is_file():
            raise UserError(f"cannot load base model {src!r}: it has no {name} (give a diffusers pipeline folder with "
                            "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, or a hub id)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(src, name, revision=revision))
        except Exception as e:  # noqa: BLE001 - the hub client raises many types
            first = first_line(e)
            raise UserError(f"cannot load base model {src!r}: {name}: {first}") from None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); the model folder is corrupt") from None


def single_file(src: str) -> bool:
    """Whether `src` is one checkpoint file (not a diffusers folder or a hub id)."""
    return Path(src).expanduser().is_file()


def config_source(src: str, base_config: str | None = None) -> str:
    """Where the configs of the base model at `src` are read: `src` itself, or for a single file `base_config`.
    UserError for a single file without `base_config`, one that is not .safetensors, or `base_config` beside a
    folder or hub id (it would be ignored)."""
    if not single_file(src):
        if base_config:
            raise UserError(f"--base_config is for a single-file checkpoint, but {src} is a diffusers folder or hub "
                            "id (it has its own configs): leave --base_config out")
        return src
    if Path(src).suffix != ".safetensors":
        raise UserError(f"{src} is not a .safetensors file: only safetensors single files are read (never pickled "
                        ".ckpt files); give a .safetensors checkpoint or a diffusers folder")
    if not base_config:
        raise UserError(f"{src} is a single-file checkpoint: give --base_config DIR, a diffusers folder (or hub id) of "
                        "the same family for its configs, tokenizers and scheduler (e.g. stabilityai/stable-diffusion-"
                        "xl-base-1.0 for an SDXL fine-tune)")
    return base_config


def detect_family(src: str, revision: str | None = None, base_config: str | None = None) -> Family:
    """The family of the pipeline at `src` (a local folder or hub id; a single file: of `base_config`), from its
    model_index.json `_class_name` and its UNet's config, before any weights load. UserError for an unsupported
    class, naming it and the supported."""
    check_base_model(src)
    if (configs := config_source(src, base_config)) != src:
        check_base_model(configs)
        src = configs
    index = _read_json(src, "model_index.json", revision)
    cls = index.get("_class_name")
    if cls not in SUPPORTED:
        raise UserError(f"{src} is a {cls or 'pipeline of unknown class'}, which this tool cannot train; supported: "
                        f"{supported_line()}")
    if cls == "StableDiffusionXLPipeline":
        missing = [k for k in ("text_encoder_2", "tokenizer_2") if not (index.get(k) or [None, None])[1]]
        if missing:
            raise UserError(f"{src} is an SDXL pipeline without its second text encoder ({', '.join(missing)} "
                            "missing in model_index.json): give the full SDXL folder")
        return FAMILIES["sdxl"]
    return family_of_unet(_read_json(src, "unet/config.json", revision))


def family_of_unet(config) -> Family:
    """The family of a UNet by its config (a dict, or a loaded UNet's config): SDXL's adds the pooled text embedding
    and the time ids; SD 2.x's projects attention with linear layers, SD 1.x's with 1x1 convolutions."""
    if config.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    return FAMILIES["sd2" if config.get("use_linear_projection") else "sd1"]


def resolution_of(unet_config: dict, vae_config: dict) -> int:
    """The resolution a model was trained at: its UNet's sample size x its VAE's factor (SD1.5 and SD2-base 512,
    SD2 768-v 768, SDXL 1024)."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def default_resolution(src: str, revision: str | None = None, base_config: str | None = None) -> int:
    """`resolution_of` the model at `src` (a single file: of `base_config`), read from its configs (no weights)."""
    src = config_source(src, base_config)
    return resolution_of(_read_json(src, "unet/config.json", revision), _read_json(src, "vae/config.json", revision))


def torch_dtype(word: str | torch.dtype | None, device=None) -> torch.dtype:
    """One precision vocabulary for every command: no / fp32, fp16, bf16 (None: fp16 on a GPU, else fp32)."""
    if isinstance(word, torch.dtype):
        return word
    if word is None:
        return torch.float16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    table = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if word not in table:
        raise UserError(f"unknown precision {word!r}; valid: {', '.join(table)}")
    return table[word]


class Base:
    """The frozen parts of one base model, loaded once: tokenizers, text encoders, VAE, UNet, the training noise
    schedule, and the rules of its family (conditioning, latents, loss target, pipeline, defaults)."""

    def __init__(self, family: Family, src: str, tokenizers, text_encoders, vae, unet, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.family, self.src = family, src
        self.tokenizers, self.text_encoders, self.vae, self.unet = list(tokenizers), list(text_encoders), vae, unet
        self.scheduler_config = scheduler_config
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.vae_config = dict(vae.config)  # kept when the VAE is freed
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_scaling = (vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, src: str, *, revision: str | None = None, variant: str | None = None, dtype=None, device=None,
             vae: str | None = None, base_config: str | None = None, family: Family | None = None) -> "Base":
        """The base model at `src` (hub id, local diffusers folder, or a single .safetensors file with
        `base_config`), frozen, on `device` in `dtype`; `vae` a replacement VAE (hub id or folder, e.g. an
        fp16-safe SDXL VAE); `family`: what `detect_family` already said of `src` (not asked again)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        family = family or detect_family(src, revision, base_config)
        device, dtype = torch.device(device or "cpu"), torch_dtype(dtype, device)
        if single_file(src):
            return cls._load_single_file(family, src, base_config, dtype, device, vae, revision)
        kw = {"revision": revision}
        weights = {"variant": variant, "torch_dtype": dtype, **kw}  # read straight into the compute dtype
        encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        try:
            tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder=sub.replace("text_encoder", "tokenizer"), **kw)
                          for sub in family.text_encoders]
            text_encoders = [encoders[sub].from_pretrained(src, subfolder=sub, variant=variant, dtype=dtype, **kw)
                             for sub in family.text_encoders]  # transformers names it dtype
            vae_model = AutoencoderKL.from_pretrained(vae, **weights) if vae else \
                AutoencoderKL.from_pretrained(src, subfolder="vae", **weights)
            unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **weights)
            scheduler_config = dict(DDPMScheduler.load_config(src, subfolder="scheduler", **kw))
        except (OSError, ValueError) as e:
            first = first_line(e)
            raise UserError(f"cannot load base model {src!r}: {first} (give a hub id or a local diffusers folder "
                            f"with {', '.join(('unet', 'vae', 'scheduler') + family.text_encoders)}/ and "
                            "their tokenizers)") from None
        for m in (*text_encoders, vae_model, unet):
            m.requires_grad_(False).eval().to(device)  # already in `dtype`: no cast (and no diffusers warning)
        return cls(family, src, tokenizers, text_encoders, vae_model, unet, scheduler_config)

    @classmethod
    def _load_single_file(cls, family: Family, src: str, base_config: str, dtype, device, vae: str | None,
                          revision: str | None = None) -> "Base":
        """The parts of the family's pipeline loaded by diffusers' from_single_file from the original-layout file
        `src`, with the configs, tokenizers and scheduler of the diffusers folder (or hub id, at `revision`)
        `base_config`."""
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler

        extra = {"safety_checker": None, "feature_extractor": None} if family.pipeline == "StableDiffusionPipeline" \
            else {}
        # from_single_file casts each model with .to(dtype), on which diffusers warns of an empty list of modules
        # to keep in fp32 ("should be kept in float32: []"): noise, left out
        quiet = logging.Filter()
        quiet.filter = lambda record: "should be kept in float32: []" not in record.getMessage()
        noisy = logging.getLogger("diffusers.models.modeling_utils")
        noisy.addFilter(quiet)
        try:
            if vae:
                extra["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
            pipe = getattr(diffusers, family.pipeline).from_single_file(
                src, config=base_config, local_files_only=Path(base_config).expanduser().is_dir(), torch_dtype=dtype,
                revision=revision, **extra)
            scheduler_config = dict(DDPMScheduler.load_config(base_config, subfolder="scheduler", revision=revision))
        except Exception as e:  # noqa: BLE001 - diffusers' conversion raises many types for a file of another model
            first = first_line(e)
            raise UserError(f"cannot load the single-file checkpoint {src} as {family.label} (configs of "
                            f"{base_config}): {first} (is --base_config a diffusers folder of the file's family?)"
                            ) from None
        finally:
            noisy.removeFilter(quiet)
        tokenizers = [getattr(pipe, sub.replace("text_encoder", "tokenizer")) for sub in family.text_encoders]
        text_encoders = [getattr(pipe, sub) for sub in family.text_encoders]
        for m in (*text_encoders, pipe.vae, pipe.unet):
            m.requires_grad_(False).eval().to(device)
        return cls(family, src, tokenizers, text_encoders, pipe.vae, pipe.unet, scheduler_config)

    def free_encoders(self) -> None:
        """Drop the text encoders and the VAE (once latents and prompt embeddings are cached)."""
        self.text_encoders, self.vae = [], None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the family's defaults
    def adapter_record(self) -> dict:
        """What an adapter trained on this base records of it (its config's family and prediction_type): what
        generate checks an adapter against, and the export's base-model metadata."""
        return {"family": self.family.name, "prediction_type": self.prediction_type}

    @property
    def default_resolution(self) -> int:
        return resolution_of(self.unet.config, self.vae_config)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        """The UNet's conditioning of `prompt`, batch-first tensors of batch 1: encoder_hidden_states (1, 77, D)
        and, for SDXL, text_embeds (1, 1280) (time_ids come from each image: `image_conditioning`)."""
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompt, padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(enc.device)
            if self.family.penultimate:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # CLIPTextModelWithProjection: text_embeds, the pooled projection
            else:
                hidden.append(enc(ids)[0])
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if self.family.pooled:
            cond["text_embeds"] = pooled
        return cond

    def image_conditioning(self, original_size, crop_top_left, target_size) -> dict[str, torch.Tensor]:
        """Conditioning that follows a training image (SDXL's time ids: original size, crop top-left, target size,
        as (1, 6)); {} for families without it."""
        if not self.family.pooled:
            return {}
        return {"time_ids": torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)}

    @staticmethod
    def unet_kwargs(cond: dict[str, torch.Tensor]) -> dict:
        """The UNet call's keyword arguments from a flat conditioning dict."""
        added = {k: cond[k] for k in ADDED_COND if k in cond}
        out = {k: v for k, v in cond.items() if k not in ADDED_COND}
        if added:
            out["added_cond_kwargs"] = added
        return out

    # ------------------------------------------------------------------ latents and the loss
    @torch.no_grad()
    def latent_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's latent distribution of `images` (B, 3, H, W) in [-1, 1]."""
        vae, dtype = self.vae, self.vae.dtype
        upcast = self.family.upcast_vae and dtype == torch.float16  # SDXL's VAE overflows in fp16: encode in fp32
        if upcast:
            vae.to(torch.float32)
        try:
            d = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        finally:
            if upcast:
                vae.to(dtype)  # the pipeline upcasts for decoding by itself (force_upcast)
        return d.mean, d.std

    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        scale, shift = self.vae_scaling
        return (sample if shift is None else sample - shift) * scale

    def add_noise(self, latents, noise, t):
        return self.noise_scheduler.add_noise(latents, noise, t)

    def target(self, latents, noise, t) -> torch.Tensor:
        """What the UNet learns to predict: the noise (epsilon) or the velocity (v), as the scheduler says."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        raise UserError(f"prediction_type {self.prediction_type!r} of {self.src} is not supported (epsilon or "
                        "v_prediction)")

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    # ------------------------------------------------------------------ sampling
    def pipeline(self, unet=None, scheduler: str | None = None):
        """The family's diffusers pipeline over the loaded parts (UNet: `unet`, default the base's), with the
        sampler `scheduler` (a SCHEDULERS name; None: the folder's own), progress bar off."""
        import diffusers

        if scheduler and scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        name = SCHEDULERS[scheduler] if scheduler else self.scheduler_config.get("_class_name", "DDIMScheduler")
        if self.vae is None:
            raise UserError("the VAE and text encoders were freed after caching: sampling needs them")
        parts = {"vae": self.vae, "unet": unet if unet is not None else self.unet,
                 "scheduler": getattr(diffusers, name).from_config(self.scheduler_config)}
        for i, (tok, enc) in enumerate(zip(self.tokenizers, self.text_encoders)):
            suffix = "" if i == 0 else f"_{i + 1}"
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tok, enc
        if self.family.pipeline == "StableDiffusionPipeline":
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = getattr(diffusers, self.family.pipeline)(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe
