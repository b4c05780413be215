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

# SD1.5's UNet config (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json), less the defaults.
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
# SD2.1's (stabilityai/stable-diffusion-2-1, the 768-v model) configs, less the defaults. attention_head_dim is,
# in diffusers' naming, the number of heads per block (64 channels each); upcast_attention is 2.1-768's (the 2.1
# base model has it off).
SD21_UNET_CONFIG = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD21_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 768}
# OpenCLIP ViT-H/14's text tower in transformers' format (text_encoder/config.json): 23 of its 24 layers (SD2 reads
# the penultimate layer, and the converted checkpoint drops the last), gelu, ids as the converted config has them.
SD21_TEXT_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    max_position_embeddings=77, vocab_size=49408, projection_dim=512, hidden_act="gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# SD2.1-768's scheduler (scheduler/scheduler_config.json): DDIM, v-prediction.
SD21_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="v_prediction",
)
# SDXL-base-1.0's configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/,
# scheduler/), less the defaults. The UNet: 70 transformer blocks (down 2x2 + 2x10, mid 10, up 3x10 + 3x2),
# text_time micro-conditioning: add_embedding reads 6 size/crop numbers x 256 + the pooled 1280 = 2816 features.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# CLIP ViT-L/14 (as SD1.5's) and OpenCLIP ViT-bigG/14's text tower with its projection (the pooled 1280).
SDXL_TEXT_CONFIG = {**SD15_TEXT_CONFIG, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
SDXL_TEXT2_CONFIG = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# SDXL's scheduler (scheduler/scheduler_config.json): Euler, epsilon, "leading" timesteps.
SDXL_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False,
    skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False,
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


# SD2-shaped: linear projections, heads per block (2 and 4 of 16 channels, as SD2's 5/10/20/20 of 64), a gelu text
# encoder of width 48 between the block widths (cross-attention keys 48 -> 32 and 48 -> 64, as the tiny SD1).
TINY_SD2_UNET_CONFIG = {**TINY_UNET_CONFIG, "attention_head_dim": (2, 4), "use_linear_projection": True,
                        "upcast_attention": True}
TINY_SD2_TEXT_CONFIG = {**TINY_TEXT_CONFIG, "hidden_act": "gelu", "projection_dim": 32, "bos_token_id": 0,
                        "eos_token_id": 2, "pad_token_id": 1}
# SDXL-shaped: three levels, the first without attention, 2 layers per block (so the original model's block numbers,
# input_blocks.4 ... output_blocks.5, are SDXL's), 1/1/2 transformer layers (SDXL's 1/2/10), two text encoders of
# widths 32 + 48 = 80 between the attention levels' widths 64 and 96 (cross-attention keys 80 -> 64 and 80 -> 96),
# text_time conditioning of 6 x 8 + the pooled 40 = 88 features.
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=80,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 40, norm_num_groups=8,
)
TINY_SDXL_VAE_CONFIG = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
TINY_SDXL_TEXT_CONFIG = {**TINY_TEXT_CONFIG, "hidden_size": 32, "projection_dim": 32, "bos_token_id": 0,
                         "eos_token_id": 2, "pad_token_id": 1}
TINY_SDXL_TEXT2_CONFIG = {**TINY_TEXT_CONFIG, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 40,
                          "hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


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


def build_tiny_sd2_pipeline(out_dir, seed: int = 0) -> Path:
    """A random-weight SD-2.1-shaped pipeline of 20 MB (linear attention projections, heads per block, a gelu text
    encoder, v-prediction, the tokenizer padding with "!") in diffusers layout; returns its folder."""
    return _build_pipeline(out_dir, seed, TINY_SD2_UNET_CONFIG, TINY_VAE_CONFIG, TINY_SD2_TEXT_CONFIG,
                           scheduler=("DDIMScheduler", SD21_SCHEDULER_CONFIG), pad_token="!")


def build_sd21_pipeline(out_dir, device="cpu", dtype=torch.float16, seed: int = 0) -> Path:
    """The full SD2.1 (768-v) architecture (UNet of 865,910,724 parameters, VAE, OpenCLIP ViT-H/14 text encoder as
    a CLIPTextModel) with random weights, saved in diffusers layout, for GPU benchmarks."""
    return _build_pipeline(out_dir, seed, SD21_UNET_CONFIG, SD21_VAE_CONFIG, SD21_TEXT_CONFIG, device, dtype,
                           scheduler=("DDIMScheduler", SD21_SCHEDULER_CONFIG), pad_token="!")


def build_tiny_sdxl_pipeline(out_dir, seed: int = 0) -> Path:
    """A random-weight SDXL-shaped pipeline of 45 MB (two text encoders, text_time micro-conditioning, 1/1/2
    transformer layers per level, the original model's block numbering, Euler) in diffusers layout; returns its
    folder."""
    return _build_sdxl(out_dir, seed, TINY_SDXL_UNET_CONFIG, TINY_SDXL_VAE_CONFIG, TINY_SDXL_TEXT_CONFIG,
                       TINY_SDXL_TEXT2_CONFIG)


def build_tiny(family: str, out_dir) -> Path:
    """The tiny random-weight pipeline of a family (base.FAMILIES' names: sd1, sd2, sdxl); returns its folder."""
    builders = {"sd1": build_tiny_pipeline, "sd2": build_tiny_sd2_pipeline, "sdxl": build_tiny_sdxl_pipeline}
    return builders[family](out_dir)


def build_sdxl_pipeline(out_dir, device="cpu", dtype=torch.float16, seed: int = 0) -> Path:
    """The full SDXL-base-1.0 architecture (UNet of 2,567,463,684 parameters, VAE, CLIP ViT-L/14 and OpenCLIP
    ViT-bigG/14 text encoders) with random weights, saved in diffusers layout, for GPU benchmarks."""
    return _build_sdxl(out_dir, seed, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_TEXT_CONFIG, SDXL_TEXT2_CONFIG,
                       device, dtype)


def _tokenizer(out: Path, pad_token: str = "<|endoftext|>"):
    """CLIP's tokenizer (write_clip_tokenizer's files, read back by transformers), padding with `pad_token`."""
    from transformers import CLIPTokenizer

    tok_dir = write_clip_tokenizer(out / "_tokenizer_src")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                              pad_token=pad_token)
    shutil.rmtree(tok_dir)
    return tokenizer


def _build_pipeline(out_dir, seed, unet_config, vae_config, text_config, device="cpu", dtype=None,
                    scheduler=("PNDMScheduler", SD15_SCHEDULER_CONFIG), pad_token="<|endoftext|>") -> Path:
    """Random-weight parts (seeded) saved with the real CLIP tokenizer and the scheduler as a pipeline folder
    (SD1.5's PNDM by default)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**unet_config).to(dtype), AutoencoderKL(**vae_config).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)  # dtype None: as built
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(out, pad_token),
                                   unet=unet, scheduler=getattr(diffusers, scheduler[0]).from_config(scheduler[1]),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    if scheduler[0] == "PNDMScheduler":
        sched = out / "scheduler" / "scheduler_config.json"  # SD1.5's file carries clip_sample=false for DDPM
        sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": False}, indent=2))
    return out


def _build_sdxl(out_dir, seed, unet_config, vae_config, text_config, text2_config, device="cpu", dtype=None) -> Path:
    """Random-weight SDXL parts (seeded) saved with two CLIP tokenizers (the second padding with "!", as
    SDXL's tokenizer_2) and SDXL's Euler scheduler as a StableDiffusionXLPipeline folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**unet_config).to(dtype), AutoencoderKL(**vae_config).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text2_config)).to(dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tokenizer(out),
        tokenizer_2=_tokenizer(out, pad_token="!"), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
