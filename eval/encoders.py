"""Feature encoders for the fidelity benchmark: a small registry of injectable encoders.

    available_encoders()                       -> ['clip', 'dino']
    load_encoder('clip', checkpoint=None)      -> Encoder  (OpenAI CLIP ViT-B/32 through open_clip)
    load_encoder('dino', checkpoint=None)      -> Encoder  (DINO ViT-S/16 through timm)
    register_encoder('mine', factory)          -> add your own (tests inject tiny random models)

Every Encoder applies the protocol's own preprocessing (built here with torchvision, never the
library's default transform), runs in fp32, batches, and returns L2-normalised features on the
CPU, keyed by the metric they feed ('clip_i', 'dino', optionally 'dino_patch'); an encoder with
a text tower also embeds prompts for its text metric ('clip_t').

Weights: with checkpoint=None the libraries fetch them from the hub (what users with a network
run). Offline, pass a local file (state dict: .safetensors, or .bin/.pth read with
torch.load(weights_only=True)) or a local folder (open_clip / timm hub layout); docs/EVAL.md
lists where to get them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from dreambooth_singlora.errors import UserError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT_LENGTH = 77

CLIP_MODEL = "ViT-B-32"
CLIP_PRETRAINED = "openai"
DINO_MODEL = "vit_small_patch16_224.dino"


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def dino_transform() -> T.Compose:
    """The protocol's DINO preprocessing: short side 256 bicubic, centre crop 224, ImageNet stats.

    (timm's own data config for this model has crop_pct 0.9, i.e. resize to 248: not the protocol.)
    """
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def clip_transform(size: int = 224) -> T.Compose:
    """OpenAI CLIP's preprocessing: short side to 224 bicubic, centre crop 224, CLIP stats."""
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # PIL decodes/resizes without the GIL


def parallel_map(fn, items) -> list:
    """[fn(x) for x in items], on a few threads (image decoding and preprocessing)."""
    return list(_POOL.map(fn, items))


@dataclass
class Encoder:
    """An image (and optionally text) feature extractor used for scoring.

    image_fn maps a preprocessed batch (B, 3, H, W) on `device` to {metric: (B, D)} for every
    name in image_metrics. text_fn, if given, maps a list of prompts to (B, D) features that are
    compared with the image features of `text_pairs_with` under the name `text_metric`.
    `settings` is recorded beside every score this encoder makes.
    """

    name: str
    transform: Callable[[Image.Image], torch.Tensor]
    image_fn: Callable[[torch.Tensor], dict]
    image_metrics: tuple
    text_fn: Optional[Callable[[list], torch.Tensor]] = None
    text_metric: Optional[str] = None
    text_pairs_with: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image_metrics = tuple(self.image_metrics)
        if self.text_fn is not None and not (self.text_metric and self.text_pairs_with in self.image_metrics):
            raise ValueError(f"encoder {self.name!r}: a text_fn needs text_metric and text_pairs_with, one of "
                             f"{self.image_metrics}")

    @property
    def metrics(self) -> tuple:
        """Every metric this encoder feeds, image metrics first."""
        return self.image_metrics + ((self.text_metric,) if self.text_fn is not None else ())

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> dict:
        """PIL images -> {metric: (N, D) fp32 L2-normalised features on the CPU}."""
        chunks: dict = {m: [] for m in self.image_metrics}
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(parallel_map(self.transform, images[start:start + self.batch_size]))
            out = self.image_fn(batch.to(self.device, torch.float32))
            for m in self.image_metrics:
                chunks[m].append(F.normalize(out[m].float(), dim=-1).cpu())
        return {m: (torch.cat(c) if c else torch.empty(0)) for m, c in chunks.items()}

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (N, D) fp32 L2-normalised text features on the CPU."""
        if self.text_fn is None:
            raise UserError(f"encoder {self.name!r} has no text tower")
        chunks = [F.normalize(self.text_fn(list(texts[s:s + self.batch_size])).float(), dim=-1).cpu()
                  for s in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0)


def image_encoder(name: str, model: torch.nn.Module, transform: Callable, metric: Optional[str] = None,
                  device=None, batch_size: int = 32, settings: Optional[dict] = None) -> Encoder:
    """Wrap any model(x) -> (B, D) with its transform as a one-metric image Encoder (for injection)."""
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).float().eval()
    metric = metric or name
    return Encoder(name=name, transform=transform, image_fn=lambda x: {metric: model(x)},
                   image_metrics=(metric,), device=device, batch_size=batch_size,
                   settings=dict(settings or {}, model=type(model).__name__))


# ---------------------------------------------------------------------------------------------
# CLIP (OpenAI ViT-B/32 through open_clip)

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _check_path(checkpoint, what: str) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"{what} checkpoint {str(checkpoint)!r} does not exist (give a weights file or a "
                        "model folder; see docs/EVAL.md)")
    return path


def clip_tokenizer(model_name: str = CLIP_MODEL, context_length: int = CLIP_CONTEXT_LENGTH):
    """open_clip's CLIP tokenizer: [SOT] + BPE + [EOT], zero padded to 77; a longer prompt is cut
    to 77 tokens whose last one is set back to EOT (so the EOT feature still exists)."""
    import open_clip

    return open_clip.get_tokenizer(model_name, context_length=context_length)


def load_clip(checkpoint=None, device=None, *, model_name: str = CLIP_MODEL, pretrained: str = CLIP_PRETRAINED,
              quick_gelu: bool = True, batch_size: int = 32, model_kwargs: Optional[dict] = None) -> Encoder:
    """OpenAI CLIP ViT-B/32 as an Encoder with metrics 'clip_i' (image) and 'clip_t' (text).

    checkpoint: None -> open_clip.create_model(model_name, pretrained='openai') (downloads);
    a file -> the same architecture with pretrained=<file> (.safetensors / .bin / .pt state dict);
    a folder -> 'local-dir:<folder>' (open_clip_config.json + weights, e.g. a snapshot of
    timm/vit_base_patch32_clip_224.openai). quick_gelu: OpenAI's CLIP was trained with QuickGELU,
    which open_clip's plain 'ViT-B-32' config does not use (it only warns), so it is forced on.
    model_kwargs override the architecture (tests build tiny random-weight CLIPs this way).
    """
    import open_clip

    device = torch.device(device) if device is not None else default_device()
    if checkpoint is None:
        name, source, where = model_name, pretrained, f"{model_name} pretrained={pretrained!r} (from the hub)"
    else:
        path = _check_path(checkpoint, "CLIP")
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise UserError(f"CLIP checkpoint folder {str(path)!r} has no open_clip_config.json; give the "
                                "folder of an open_clip model (e.g. timm/vit_base_patch32_clip_224.openai) or a weights file")
            name, source, where = f"local-dir:{path}", None, f"folder {str(path)!r}"
        else:
            name, source, where = model_name, str(path), f"{model_name} weights file {str(path)!r}"
    try:
        model = open_clip.create_model(name, pretrained=source, precision="fp32", device=device,
                                       force_quick_gelu=quick_gelu, **(model_kwargs or {}))
        tokenizer = clip_tokenizer(name)
    except Exception as e:  # any failure to get the weights is a setup problem the user must fix
        hint = " (no network? pass --clip_checkpoint, see docs/EVAL.md)" if checkpoint is None else ""
        if "TorchScript" in str(e):
            raise UserError(f"could not load CLIP from {where}: it is a TorchScript archive (OpenAI's original "
                            "ViT-B-32.pt), which is not loaded because it can run code; use open_clip_model."
                            "safetensors from timm/vit_base_patch32_clip_224.openai (see docs/EVAL.md)") from e
        raise UserError(f"could not load CLIP from {where}: {_first_line(e)}{hint}") from e
    model.eval()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    if tokenizer.context_length != CLIP_CONTEXT_LENGTH:
        logger.warning("CLIP tokenizer context length is %d, the protocol uses %d",
                       tokenizer.context_length, CLIP_CONTEXT_LENGTH)

    def image_fn(x):
        return {"clip_i": model.encode_image(x)}

    def text_fn(texts):
        return model.encode_text(tokenizer(texts).to(device))

    settings = dict(library="open_clip", model=name,
                    pretrained=pretrained if checkpoint is None else str(checkpoint), quick_gelu=quick_gelu,
                    precision="fp32", image_size=image_size, context_length=tokenizer.context_length,
                    truncation="keep end token", transform=f"Resize({image_size}, bicubic) -> CenterCrop({image_size})"
                    " -> ToTensor -> Normalize(CLIP mean/std)", feature="projected image/text embedding, L2-normalised")
    if model_kwargs:
        settings["model_kwargs"] = model_kwargs
    return Encoder(name="clip", transform=clip_transform(image_size), image_fn=image_fn, image_metrics=("clip_i",),
                   text_fn=text_fn, text_metric="clip_t", text_pairs_with="clip_i", device=device,
                   batch_size=batch_size, settings=settings)


# ---------------------------------------------------------------------------------------------
# DINO (ViT-S/16 through timm)

def load_dino(checkpoint=None, device=None, *, model_name: str = DINO_MODEL, patch_tokens: bool = False,
              batch_size: int = 32, model_kwargs: Optional[dict] = None) -> Encoder:
    """DINO ViT-S/16 as an Encoder with metric 'dino' (CLS token after the final LayerNorm).

    checkpoint: None -> timm.create_model(model_name, pretrained=True) (downloads); a file ->
    pretrained_cfg_overlay=dict(file=<file>) (timm or original DINO state dict, .safetensors or
    .pth); a folder -> 'local-dir:<folder>' (config.json + model.safetensors, e.g. a snapshot of
    timm/vit_small_patch16_224.dino). patch_tokens adds the diagnostic metric 'dino_patch': the
    cosine of the flattened patch tokens (position-sensitive; off by default, not the protocol).
    """
    import timm

    device = torch.device(device) if device is not None else default_device()
    kwargs = dict(model_kwargs or {})
    if checkpoint is None:
        name, where = model_name, f"{model_name} (from the hub)"
    else:
        path = _check_path(checkpoint, "DINO")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"DINO checkpoint folder {str(path)!r} has no config.json; give the folder of a "
                                "timm model (e.g. timm/vit_small_patch16_224.dino) or a weights file")
            name, where = f"local-dir:{path}", f"folder {str(path)!r}"
        else:
            name, where = model_name, f"{model_name} weights file {str(path)!r}"
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # any failure to get the weights is a setup problem the user must fix
        hint = " (no network? pass --dino_checkpoint, see docs/EVAL.md)" if checkpoint is None else ""
        raise UserError(f"could not load DINO from {where}: {_first_line(e)}{hint}") from e
    model = model.to(device).float().eval()
    prefix = getattr(model, "num_prefix_tokens", 1)

    def image_fn(x):
        tokens = model.forward_features(x)  # (B, prefix + patches, D), after the final norm
        out = {"dino": tokens[:, 0]}
        if patch_tokens:
            out["dino_patch"] = tokens[:, prefix:].flatten(1)  # (B, patches * D)
        return out

    settings = dict(library="timm", model=name,
                    pretrained="hub" if checkpoint is None else str(checkpoint), precision="fp32",
                    feature="CLS token after the final LayerNorm, L2-normalised",
                    transform="Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet mean/std)",
                    patch_tokens=patch_tokens)
    if patch_tokens:
        settings["patch_feature"] = "flattened patch tokens after the final LayerNorm (diagnostic)"
    if model_kwargs:
        settings["model_kwargs"] = {k: v for k, v in model_kwargs.items() if k != "pretrained_cfg_overlay"}
    metrics = ("dino", "dino_patch") if patch_tokens else ("dino",)
    return Encoder(name="dino", transform=dino_transform(), image_fn=image_fn, image_metrics=metrics,
                   device=device, batch_size=batch_size, settings=settings)


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict = {"clip": load_clip, "dino": load_dino}


def available_encoders() -> list:
    """Names load_encoder accepts."""
    return list(_REGISTRY)


def register_encoder(name: str, factory: Callable[..., Encoder]) -> None:
    """Add (or replace) an encoder: factory(checkpoint=None, device=None, **kwargs) -> Encoder."""
    _REGISTRY[name] = factory


def load_encoder(name: str, checkpoint=None, device=None, **kwargs) -> Encoder:
    """Build the registered encoder `name` (see available_encoders())."""
    if name not in _REGISTRY:
        raise UserError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    return _REGISTRY[name](checkpoint=checkpoint, device=device, **kwargs)


def load_encoders(names: Sequence[str] = ("clip", "dino"), checkpoints: Optional[dict] = None, device=None,
                  dino_patch_tokens: bool = False, batch_size: int = 32) -> list:
    """Several encoders at once; checkpoints maps an encoder name to its local weights."""
    checkpoints = checkpoints or {}
    if len(set(names)) != len(names) or not names:
        raise UserError(f"give each encoder once, at least one: got {list(names)}")
    if dino_patch_tokens and "dino" not in names:
        raise UserError("--dino_patch_tokens needs the dino encoder (add 'dino' to --encoders)")
    encoders = []
    for name in names:
        extra = dict(patch_tokens=True) if name == "dino" and dino_patch_tokens else {}
        if name in ("clip", "dino"):
            extra["batch_size"] = batch_size
        encoders.append(load_encoder(name, checkpoint=checkpoints.get(name), device=device, **extra))
    return encoders
