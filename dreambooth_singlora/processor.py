"""The attention-processor hook that places SingLoRA on the UNet's attention projections.

`attention()` computes exactly what diffusers' `AttnProcessor2_0` (SDPA) computes, or its xformers
path when asked, with one change: every projection goes through `project(layer, target, x)`.
`SingLoRAAttnProcessor` passes its own `project`, which adds the SingLoRA term to the adapted
projections (to_q and to_k by default): `query = attn.to_q(h) + singlora_q(h)`. A processor is an
nn.Module, so diffusers registers it (and its A matrices) under the `Attention` module:
unet.parameters() and unet.to() see the adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .singlora import SingLoRA


def require_xformers() -> None:
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        raise UserError(f"xformers attention was asked for, but xformers cannot be imported ({e}); install "
                        "xformers built for your torch (pip install xformers) or leave it off (SDPA)") from None


def key_of(target: str) -> str:
    """ModuleDict key of a target projection ("to_out.0" -> "to_out_0": keys cannot hold ".")."""
    return target.replace(".", "_")


def attention(attn, project, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
              use_xformers: bool = False):
    """diffusers' AttnProcessor2_0.__call__ line for line, each projection computed by project(layer, target, x)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = project(attn.to_q, "to_q", hidden_states)  # (B, Nq, inner)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = project(attn.to_k, "to_k", encoder_hidden_states)  # (B, Nk, inner)
    value = project(attn.to_v, "to_v", encoder_hidden_states)

    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Nq, hd)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    if use_xformers:
        import xformers.ops

        # xformers wants (B, N, H, hd) and a bias of the full (B, H, Nq, Nk): it does not broadcast
        if attention_mask is not None:
            attention_mask = attention_mask.expand(-1, -1, query.shape[2], -1)
        hidden_states = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_bias=attention_mask, scale=attn.scale).transpose(1, 2)
    else:
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)

    hidden_states = project(attn.to_out[0], "to_out.0", hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class AdapterAttnProcessor(nn.Module):
    """An attention processor that holds adapter tensors: `attention()` with this processor's `project`."""

    use_xformers: bool = False

    def project(self, layer: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return nn.Module.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return attention(attn, self.project, hidden_states, encoder_hidden_states, attention_mask, temb,
                         self.use_xformers)


class SingLoRAAttnProcessor(AdapterAttnProcessor):
    """SDPA (or xformers) attention with SingLoRA terms on the chosen projections of one `Attention`."""

    def __init__(self, attn, rank: int, alpha: float, init: str, targets=("to_q", "to_k"),
                 use_xformers: bool = False):
        super().__init__()
        if use_xformers:
            require_xformers()
        self.targets = tuple(targets)
        self.adapters = nn.ModuleDict()
        for t in self.targets:
            layer = attn.get_submodule(t)  # read sizes from the module, not from names
            self.adapters[key_of(t)] = SingLoRA(layer.in_features, layer.out_features, rank, alpha, init)
        self.merged = False
        self.use_xformers = use_xformers

    def project(self, layer: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
        y = layer(x)
        key = key_of(target)
        if self.merged or key not in self.adapters:
            return y  # no "+ 0": an unadapted projection costs what the stock processor's does
        return y + self.adapters[key](x)
