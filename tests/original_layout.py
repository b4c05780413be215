"""A diffusers SD 1.x, 2.x or SDXL pipeline folder written as one original-layout (CompVis / A1111 / ComfyUI)
.safetensors file, what most fine-tunes are shared as, made here from the tiny random-weight pipelines (diffusers
has no writer for it).

The key names are the inverse of diffusers' own single-file conversion (diffusers.loaders.single_file_utils:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint)
for any number of levels and layers per block; the tests that use it check that diffusers reads every tensor back
to the folder's value.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{RESNET.get(layer, layer)}.{tail}"


def unet_key(key: str, layers_per_block: int, up_attention: set) -> str:
    """The original UNet's name of diffusers' `key` (without the model.diffusion_model. prefix)."""
    n = layers_per_block + 1  # input blocks per level (layers + the downsampler); output blocks per level
    module, _, param = key.rpartition(".")
    if module in UNET_FIXED:
        return f"{UNET_FIXED[module]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):  # after the level's last resnet (and attention)
        return f"output_blocks.{int(m[1]) * n + layers_per_block}.{2 if int(m[1]) in up_attention else 1}.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> tuple[str, bool]:
    """The original VAE's name of diffusers' `key`, and whether it is an attention weight (a 1x1 convolution there)."""
    part, _, rest = key.partition(".")  # encoder / decoder / quant_conv ...
    subs = [(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"down.{m[1]}.block.{m[2]}."),
            (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
            (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}."),
            (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample."),
            (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
            (r"conv_norm_out\.", lambda m: "norm_out.")]
    for pattern, repl in subs:
        rest = re.sub("^" + pattern, repl, rest)
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    attention = rest.startswith("mid_block.attentions.0.")
    if attention:
        module, _, param = rest.removeprefix("mid_block.attentions.0.").rpartition(".")
        rest = f"mid.attn_1.{VAE_ATTENTION[module]}.{param}"
    return f"{part}.{rest}" if rest else part, attention


OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_keys(state: dict, prefix: str) -> dict:
    """A transformers CLIP text model's tensors under `prefix` (SD 1.x: cond_stage_model.transformer., SDXL's first
    encoder: conditioner.embedders.0.transformer.), keys as the original file has them (text_model. included, which
    transformers 5 leaves out of CLIPTextModel's own files)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_keys(state: dict, prefix: str) -> dict:
    """A transformers CLIP text model's tensors in OpenCLIP's layout under `prefix` (SD 2.x: cond_stage_model.model.,
    SDXL's second encoder: conditioner.embedders.1.model.): q, k, v concatenated into in_proj, a projection
    transposed."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight")}
    if "text_projection.weight" in state:  # SDXL's second encoder (SD 2.x's has none in diffusers)
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T
    for k in [k for k in state if k.startswith("final_layer_norm.")]:
        out[prefix + "ln_final." + k.split(".")[-1]] = state.pop(k)
    for k in [k for k in state if ".self_attn.q_proj." in k]:
        layer, kind = re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", k).groups()
        qkv = [state.pop(k.replace("q_proj", x)) for x in ("q_proj", "k_proj", "v_proj")]
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
    for k, v in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        out[f"{prefix}transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = v
    return out


def write_single_file(folder, path) -> Path:
    """The SD 1.x, 2.x or SDXL pipeline at `folder` (diffusers layout, safetensors) as one original-layout file at
    `path`."""
    import json

    folder = Path(folder)
    sdxl = json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    up_attention = {i for i, t in enumerate(unet_cfg["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for k, v in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items():
        out["model.diffusion_model." + unet_key(k, unet_cfg["layers_per_block"], up_attention)] = v
    for k, v in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items():
        name, attention = vae_key(k, len(vae_cfg["up_block_types"]))
        out["first_stage_model." + name] = v[:, :, None, None] if attention and v.dim() == 2 else v
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    if sdxl:
        out.update(clip_keys(text, "conditioner.embedders.0.transformer."))
    elif unet_cfg.get("use_linear_projection"):  # SD 2.x: OpenCLIP ViT-H's text tower
        out.update(open_clip_keys(text, "cond_stage_model.model."))
    else:
        out.update(clip_keys(text, "cond_stage_model.transformer."))
    if sdxl:
        out.update(open_clip_keys(load_file(str(folder / "text_encoder_2" / "model.safetensors")),
                                  "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return Path(path)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
