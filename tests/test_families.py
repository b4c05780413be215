"""Model families beyond SD1: the tiny SD2- and SDXL-shaped pipelines, the full-size SDXL architecture (on the meta
device), and the family-aware kohya export read back by diffusers' own loader."""

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_singlora import SingLoRAConfig, add_adapter, merge_adapter, save_adapter, set_step
from dreambooth_singlora.adapter import attention_modules
from dreambooth_singlora.base import family_of_unet
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.export import export_layout, export_lora, layers_per_block
from dreambooth_singlora.testing import SD21_UNET_CONFIG, SDXL_TEXT2_CONFIG, SDXL_TEXT_CONFIG, SDXL_UNET_CONFIG

ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def cross_attention_keys(unet) -> set:
    """(d_out, d_in) of every cross-attention key projection."""
    return {tuple(attn.to_k.weight.shape) for name, attn in attention_modules(unet) if name.endswith("attn2")}


def test_tiny_sd2_is_sd2_shaped_and_samples(tiny_sd2_pipeline):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_pipeline, safety_checker=None)
    assert pipe.unet.config.use_linear_projection and list(pipe.unet.config.attention_head_dim) == [2, 4]
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer("a dog", padding="max_length").input_ids[-1] == 0
    assert cross_attention_keys(pipe.unet) == {(32, 48), (64, 48)}  # keys 48 -> 32 (d_in > d_out) and 48 -> 64
    image = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_tiny_sdxl_is_sdxl_shaped_and_samples(tiny_sdxl_pipeline):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert list(unet.transformer_layers_per_block) == [1, 1, 2] and pipe.vae.config.force_upcast
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert cross_attention_keys(pipe.unet) == {(64, 80), (96, 80)}  # keys 80 -> 64 and 80 -> 96
    image = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: no memory, no time
        return UNet2DConditionModel(**config)


def test_full_size_sdxl_and_sd21_architectures():
    """Counts of the real SDXL-base-1.0 and SD2.1 UNets and text encoders (published: 2.57 B UNet, 817 M of text
    encoders; SD2.1's UNet 866 M), built from the configs on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sdxl = meta_unet(SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
    attn = attention_modules(sdxl)
    assert len(attn) == 140 and sum(name.endswith("attn1") for name, _ in attn) == 70
    assert cross_attention_keys(sdxl) == {(640, 2048), (1280, 2048)}
    assert sum(p.numel() for p in meta_unet(SD21_UNET_CONFIG).parameters()) == 865_910_724
    # a UNet's family by its config alone (save_adapter records it): the full-size configs, loaded and as dicts
    assert family_of_unet(sdxl.config).name == "sdxl" and family_of_unet(SD21_UNET_CONFIG).name == "sd2"
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT2_CONFIG))
    assert (sum(p.numel() for p in te1.parameters()), sum(p.numel() for p in te2.parameters())) == (
        123_060_480, 694_659_840)


def test_sdxl_kohya_names_are_the_original_models_block_names():
    """The full SDXL UNet's 560 projections named as kohya's own SDXL LoRAs name them (input_blocks_4_1_...), which
    ComfyUI, A1111 and diffusers also apply (docs/EXPORT.md); never a diffusers block name beside them."""
    paths = [f"{name}.{t}" for name, _ in attention_modules(meta_unet(SDXL_UNET_CONFIG)) for t in ALL_TARGETS]
    names = export_layout("sdxl").names(paths)
    assert len(set(names.values())) == 560
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    assert names["mid_block.attentions.0.transformer_blocks.9.attn2.to_k"] == (
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k")
    assert names["up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0"] == (
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_out_0")
    blocks = {re.match(r"lora_unet_(.+?_\d+(?:_\d+)?)_transformer", n)[1] for n in names.values()}
    assert blocks == {"input_blocks_4_1", "input_blocks_5_1", "input_blocks_7_1", "input_blocks_8_1", "middle_block_1",
                      *(f"output_blocks_{i}_1" for i in range(6))}


def test_layers_per_block_read_off_paths_or_refused():
    assert layers_per_block(["down_blocks.1.attentions.1.x", "up_blocks.0.attentions.2.x"]) == 2
    with pytest.raises(UserError, match="one more in each up block"):
        layers_per_block(["down_blocks.1.attentions.1.x", "up_blocks.0.attentions.1.x"])
    with pytest.raises(UserError, match="model family 'sd3'"):
        export_layout("sd3")


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def saved_adapter(unet, folder, family, extra=None):
    """A SingLoRA adapter with random non-zero A on all four projections, past its ramp (u = 1), saved for `family`;
    returns the UNet with the adapter merged into its weights (the project's own merge)."""
    add_adapter(unet, SingLoRAConfig(rank=4, alpha=6.0, ramp_steps=10, target_modules=ALL_TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    set_step(unet, 15)
    save_adapter(unet, folder, base_model="tiny", extra={"family": family, **(extra or {})})
    merge_adapter(unet)
    return unet


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_kohya_export_fused_by_diffusers_equals_our_merge(family, tiny_sd2_pipeline, tiny_sdxl_pipeline, tmp_path):
    """The kohya file, loaded by diffusers' load_lora_weights and fused, changes exactly the adapted projections,
    each to the project's merged weight; no key is dropped or unexpected."""
    from diffusers import UNet2DConditionModel

    src = tiny_sd2_pipeline if family == "sd2" else tiny_sdxl_pipeline
    prediction = json.loads((src / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    ours = saved_adapter(UNet2DConditionModel.from_pretrained(src, subfolder="unet"), tmp_path / "a", family,
                         {"prediction_type": prediction})
    path = export_lora(tmp_path / "a", "kohya", tmp_path / "k.safetensors")
    check_kohya_file_fused_by_diffusers(family, src, path, ours)


def check_kohya_file_fused_by_diffusers(family: str, src, path, ours) -> None:
    """The kohya file at `path` (of an adapter on every projection in ALL_TARGETS), loaded into a fresh pipeline
    of `src` by diffusers' load_lora_weights and fused, changes exactly the adapted projections, each to the
    weight the file describes and to `ours`' (the UNet with the project's merge); its metadata name the family;
    no key is dropped or unexpected. Shared with the end-to-end test of a trained adapter (test_families_e2e)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if family == "sd2" else StableDiffusionXLPipeline
    kw = {"safety_checker": None} if family == "sd2" else {}
    lora = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        assert (f.metadata()["ss_v2"], f.metadata()["ss_base_model_version"]) == (
            ("True", "sd_v2_v") if family == "sd2" else ("False", "sdxl_base_v1-0"))
    blocks = ("input_blocks", "middle_block", "output_blocks") if family == "sdxl" else (
        "down_blocks", "mid_block", "up_blocks")
    assert all(k.startswith("lora_unet_") and any(b in k for b in blocks) for k in lora)  # one naming per file
    pipe = cls.from_pretrained(src, **kw)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    caught = Warnings()
    logging.getLogger("diffusers").addHandler(caught)
    try:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers: plain state-dict keys again
    finally:
        logging.getLogger("diffusers").removeHandler(caught)
    assert not [m for m in caught.messages if "unexpected keys" in m], caught.messages  # peft_utils: dropped keys
    theirs, merged = pipe.unet.state_dict(), ours.state_dict()
    names = export_layout(family).names(f"{n}.{t}" for n, _ in attention_modules(ours) for t in ALL_TARGETS)
    assert len(names) * 3 == len(lora) and set(theirs) == set(base)
    for path_, name in names.items():
        key = f"{path_}.weight"
        down, up = lora[f"{name}.lora_down.weight"].double(), lora[f"{name}.lora_up.weight"].double()
        w0, rank = base[key].double(), down.shape[0]
        scale = lora[f"{name}.alpha"].item() / rank
        want = w0 + scale * up @ down  # float64: the update the file describes
        # each fp32 result: a length-r dot product, a scale and an add, each rounding by at most eps32 relative to
        # the magnitudes involved: (r + 2) eps32 (|W0| + (alpha/r) |up| |down|) bounds the error elementwise
        bound = (rank + 2) * torch.finfo(torch.float32).eps * (w0.abs() + scale * up.abs() @ down.abs())
        assert ((theirs[key].double() - want).abs() <= bound).all(), name
        assert ((merged[key].double() - want).abs() <= bound).all(), name
        assert ((theirs[key].double() - w0).abs() > bound).any(), name  # this key was applied
    untouched = [k for k in base if k.removesuffix(".weight") not in names]
    assert all(torch.equal(theirs[k], base[k]) for k in untouched)


def test_kohya_metadata_per_family():
    """ss_v2 and ss_base_model_version as kohya's sd-scripts write them (A1111 reads ss_v2 == "True" as SD2 and an
    "sdxl_" version as SDXL); SD1's file keeps the one key it always had."""
    assert export_layout(None).metadata() == {"ss_base_model_version": "sd_v1"}
    assert export_layout("sd2").metadata("epsilon") == {"ss_v2": "True", "ss_base_model_version": "sd_v2"}
    assert export_layout("sd2").metadata("v_prediction") == {"ss_v2": "True", "ss_base_model_version": "sd_v2_v"}
    assert export_layout("sdxl").metadata("epsilon") == {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}
