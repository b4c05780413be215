"""Tiny random-weight CLIP and DINO checkpoints, saved in the layouts the real loaders read.

No hub is reachable here, so tests (and demos of the scoring pipeline) save small random models
and load them back through load_clip / load_dino exactly as users load the real weights:
    save_tiny_clip(folder)          open_clip local-dir: open_clip_config.json + open_clip_model.safetensors
    save_tiny_clip(file.safetensors) state dict for create_model('ViT-B-32', pretrained=file, **TINY_CLIP)
    save_tiny_dino(folder)          timm local-dir: config.json + model.safetensors
    save_tiny_dino(file.safetensors) state dict for pretrained_cfg_overlay=dict(file=file), **TINY_DINO
Numbers from these models mean nothing; only the plumbing is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The real input size and text context (so the protocol's transforms and tokenizer are exercised),
# a one-layer 32/64-wide body.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=224, layers=1, width=64, patch_size=32, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)
TINY_DINO = dict(embed_dim=48, depth=2, num_heads=3)


def save_tiny_clip(path, seed: int = 0) -> Path:
    """A tiny random CLIP as an open_clip folder (path without suffix) or a .safetensors state dict."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, **TINY_CLIP)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = dict(model_cfg=dict(TINY_CLIP, quick_gelu=True),
                  preprocess_cfg=dict(mean=[0.48145466, 0.4578275, 0.40821073],
                                      std=[0.26862954, 0.26130258, 0.27577711], interpolation="bicubic",
                                      resize_mode="shortest"))
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(state, str(path / "open_clip_model.safetensors"))
    return path


def save_tiny_dino(path, seed: int = 0) -> Path:
    """A tiny random DINO-style ViT as a timm folder (path without suffix) or a .safetensors state dict."""
    import timm
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, **TINY_DINO)
    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path
    save_for_hf(model, str(path), safe_serialization=True)
    return path
