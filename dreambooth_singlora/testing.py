"""Tiny random-weight Stable Diffusion pipelines, built and saved locally.

No model hub is reachable here, so tests, demos and GPU benchmarks build the models they need, saved in diffusers
layout and loaded back through the same `from_pretrained` path users take with real weights. The tokenizer is
real: its vocabulary ships inside open_clip (bpe_simple_vocab_16e6.txt.gz) and vocab.json / merges.txt are
derived from it exactly as CLIP's SimpleTokenizer builds its own.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

# SD1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), less the defaults.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# SD1.5's VAE config (vae/config.json), less the defaults.
SD15_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
# SD1.5's text encoder, CLIP ViT-L/14 (text_encoder/config.json).
SD15_TEXT_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# SD1.5's scheduler config (scheduler/scheduler_config.json).
SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)
# cross_attention_dim 48 between the block widths 32 and 64: the tiny UNet's cross-attention keys
# go 48 -> 32 (d_in > d_out) and 48 -> 64 (d_in < d_out), self-attention is square: all three cases.
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=8, norm_num_groups=8,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
)
TINY_TEXT_CONFIG = dict(
    hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
    max_position_embeddings=77, projection_dim=48, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def write_clip_tokenizer(out_dir) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of OpenAI CLIP's tokenizer (49,408 tokens)."""
    from open_clip.tokenizer import default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]  # as SimpleTokenizer
    # CLIP's (and GPT-2's) byte -> unicode map: printable bytes as themselves, the other 68 as chr(256), chr(257), ...
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(map(chr, [*printable, *range(256, 512 - len(printable))]))
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    return out


def build_tiny_pipeline(out_dir, seed: int = 0) -> Path:
    """Build and save a few-MB random-weight SD-1.5-shaped pipeline in diffusers layout; returns its folder."""
    return _build_pipeline(out_dir, seed, TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG)


def build_sd15_pipeline(out_dir, device="cpu", dtype=torch.float16, seed: int = 0) -> Path:
    """The full SD1.5 architecture (UNet of 859,520,964 parameters, VAE, CLIP ViT-L/14 text encoder) with random
    weights, saved in diffusers layout: what speed and memory benchmarks train on where no weights exist."""
    return _build_pipeline(out_dir, seed, SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG, device, dtype)


def _build_pipeline(out_dir, seed, unet_config, vae_config, text_config, device="cpu", dtype=None) -> Path:
    """Random-weight parts (seeded) saved with the real CLIP tokenizer and SD1.5's scheduler as a pipeline folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**unet_config).to(dtype), AutoencoderKL(**vae_config).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)  # dtype None: as built
    tok_dir = write_clip_tokenizer(out / "_tokenizer_src")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    sched = out / "scheduler" / "scheduler_config.json"  # SD1.5's file carries clip_sample=false for DDPM
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": False}, indent=2))
    shutil.rmtree(tok_dir)
    return out
