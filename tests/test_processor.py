"""The attention-processor hook on the tiny UNet: off == stock, merged == unmerged, gradients, precision, xformers."""

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from dreambooth_singlora.adapter import (
    add_adapter, attention_modules, get_config, load_adapter, merge_adapter, save_adapter, set_step,
    set_use_xformers, singlora_layers, trainable_parameters,
)
from dreambooth_singlora.config import SingLoRAConfig
from dreambooth_singlora.errors import UserError

QK = ("to_q", "to_k")
ALL = ("to_q", "to_k", "to_v", "to_out.0")
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def inputs(masked=False, dtype=torch.float32):
    """Latents (2, 4, 8, 8), timesteps, text states (2, 5, 48) and, if `masked`, a text mask (2, 5)."""
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 48, generator=g)
    kw = {"encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])} if masked else {}
    return (sample.to(dtype), torch.tensor([10, 700]), text.to(dtype)), kw


def forward(unet, masked=False, dtype=torch.float32) -> torch.Tensor:
    args, kw = inputs(masked, dtype)
    return unet(*args, **kw).sample


run = torch.no_grad()(forward)


@torch.no_grad()
def perturb(unet, std=0.1):
    g = torch.Generator().manual_seed(0)
    for p in trainable_parameters(unet):
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


@pytest.mark.parametrize("targets,masked", [(QK, False), (QK, True), (ALL, False)], ids=["qk", "qk-masked", "all"])
def test_u_zero_gives_exactly_the_stock_output(targets, masked, tiny_unet):
    assert all(type(a.processor) is AttnProcessor2_0 for _, a in attention_modules(tiny_unet))
    stock = run(tiny_unet, masked)
    add_adapter(tiny_unet, SingLoRAConfig(target_modules=targets, ramp_steps=10, init="rank"))
    perturb(tiny_unet)  # a large A: only u = 0 (step 0) keeps the update off
    assert set_step(tiny_unet, 0) == 0.0
    assert torch.equal(run(tiny_unet, masked), stock)
    set_step(tiny_unet, 5)
    assert (run(tiny_unet, masked) - stock).abs().max() > 1e-2  # and u > 0 turns it on


MERGE_CASES = [("singlora", QK), ("singlora", ALL), ("lora", QK), ("dora", QK)]


@pytest.mark.parametrize("method,targets", MERGE_CASES, ids=[f"{m}-{len(t)}" for m, t in MERGE_CASES])
def test_merged_equals_unmerged(method, targets, tiny_unet):
    stock = run(tiny_unet, True)
    add_adapter(tiny_unet, SingLoRAConfig(method=method, target_modules=targets, rank=4, ramp_steps=0))
    for _ in range(3):
        perturb(tiny_unet)
    unmerged = run(tiny_unet, True)
    assert (unmerged - stock).abs().max() > 1e-2
    merge_adapter(tiny_unet)
    # fp32: (W0 + dW) x and W0 x + dW x differ only by rounding
    torch.testing.assert_close(run(tiny_unet, True), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["singlora", "lora", "dora"])
def test_gradients_reach_the_adapter_and_nothing_else(method, tiny_unet):
    add_adapter(tiny_unet, SingLoRAConfig(method=method, rank=4, ramp_steps=0))  # u = 1
    perturb(tiny_unet)
    forward(tiny_unet).square().mean().backward()
    trainable = {id(p) for p in trainable_parameters(tiny_unet)}
    if method == "singlora":
        assert trainable == {id(layer.A) for _, _, layer in singlora_layers(tiny_unet)}
    for name, p in tiny_unet.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_gradient_checkpointing_gives_the_same_gradients_without_reading_the_rng(tiny_unet, monkeypatch):
    """--gradient_checkpointing recomputes each block in the backward: the same gradients (float64, so the
    recomputation's rounding is far below the tolerance), and, with no dropout in the UNet, no RNG state saved
    (work for nothing, and a read of the CUDA generator, which CUDA graph capture refused: pytorch/pytorch#83148)."""
    import torch.utils.checkpoint

    from dreambooth_singlora.train_dreambooth import draws_random, enable_checkpointing

    unet = tiny_unet.double()
    add_adapter(unet, SingLoRAConfig(rank=4, ramp_steps=0))
    perturb(unet)

    def grads():
        for p in trainable_parameters(unet):
            p.grad = None
        forward(unet, True, torch.float64).square().mean().backward()
        return [p.grad.clone() for p in trainable_parameters(unet)]

    plain = grads()
    enable_checkpointing(unet)
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    def read_rng():
        raise AssertionError("the checkpoint saved the RNG state")

    monkeypatch.setattr(torch, "get_rng_state", read_rng)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(b, a)
    assert calls and not draws_random(unet)
    monkeypatch.undo()
    # a UNet with dropout in a checkpointed block (a fine-tune's config): its draws are replayed in the recomputation
    # (the mid block's last resnet: the backward through it reaches adapters before it, so a mask drawn anew in the
    # recomputation would change their gradients, 7.6e-5 here, far above float64's rounding)
    unet.disable_gradient_checkpointing()
    unet.mid_block.resnets[-1].dropout.p = 0.1
    unet.train()  # (from_pretrained leaves it in eval mode, where dropout draws nothing)
    assert draws_random(unet)
    torch.manual_seed(0)
    plain = grads()
    enable_checkpointing(unet)
    reads, real_read = [], torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or real_read())
    torch.manual_seed(0)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(b, a)
    assert reads


PRECISIONS = [  # (case, UNet weights dtype, autocast dtype or None, tolerance against fp32)
    ("bf16-autocast", torch.float32, torch.bfloat16, 0.1),
    ("fp16-autocast", torch.float32, torch.float16, 0.02),
    ("fp16-weights", torch.float16, None, 0.02),
    ("bf16-weights", torch.bfloat16, None, 0.1),
]


@pytest.mark.parametrize("weights,autocast,tol", [c[1:] for c in PRECISIONS], ids=[c[0] for c in PRECISIONS])
def test_low_precision_keeps_A_fp32_and_trains(weights, autocast, tol, tiny_unet):
    add_adapter(tiny_unet, SingLoRAConfig(rank=4, ramp_steps=0))
    perturb(tiny_unet)
    reference = run(tiny_unet)
    A = {id(layer.A) for _, _, layer in singlora_layers(tiny_unet)}
    for p in tiny_unet.parameters():  # the base weights only: A stays fp32, as on a UNet cast before add
        if id(p) not in A:
            p.data = p.data.to(weights)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = forward(tiny_unet, dtype=weights)
    assert out.dtype == (autocast or weights)
    torch.testing.assert_close(out.float(), reference, rtol=tol, atol=tol)
    out.float().square().mean().backward()
    for _, _, layer in singlora_layers(tiny_unet):
        assert layer.A.dtype == torch.float32 and layer.A.grad.dtype == torch.float32
        assert torch.isfinite(layer.A.grad).all() and layer.A.grad.abs().sum() > 0


def test_add_to_an_fp16_unet_keeps_A_fp32(tiny_unet):
    tiny_unet.half()
    add_adapter(tiny_unet, SingLoRAConfig(rank=4, ramp_steps=0))
    assert {layer.A.dtype for _, _, layer in singlora_layers(tiny_unet)} == {torch.float32}
    merge_adapter(tiny_unet)  # the fp32 update is rounded into the fp16 weights
    assert tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float16


# --------------------------------------------------------------------------- xformers

@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed here")
@pytest.mark.parametrize("method", ["singlora", "lora"])
def test_xformers_without_xformers_is_a_clear_error_at_add_time(method, tiny_unet, tmp_path):
    stock = {n: a.processor for n, a in attention_modules(tiny_unet)}
    with pytest.raises(UserError, match="xformers"):
        add_adapter(tiny_unet, SingLoRAConfig(method=method), use_xformers=True)
    assert get_config(tiny_unet) is None and not getattr(tiny_unet, "peft_config", None)
    assert {n: a.processor for n, a in attention_modules(tiny_unet)} == stock
    assert all(p.requires_grad for p in tiny_unet.parameters())

    add_adapter(tiny_unet, SingLoRAConfig(method=method))
    with pytest.raises(UserError, match="xformers"):
        set_use_xformers(tiny_unet, True)
    save_adapter(tiny_unet, tmp_path)
    with pytest.raises(UserError, match="xformers"):
        load_adapter(type(tiny_unet).from_config(tiny_unet.config), tmp_path, use_xformers=True)


@pytest.fixture
def strict_fake_xformers(monkeypatch):
    """An `xformers.ops.memory_efficient_attention` that holds callers to xformers' layout rules
    (q, k, v as (B, N, H, hd); a bias of exactly (B, H, Nq, Nk), never broadcast) and computes
    through SDPA, so the processor's xformers path can run here without xformers."""

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None, op=None):
        B, Nq, H, hd = q.shape
        assert k.shape == v.shape and k.shape[0] == B and k.shape[2:] == (H, hd)
        if attn_bias is not None:
            assert attn_bias.shape == (B, H, Nq, k.shape[1]), f"xformers needs the full bias, got {attn_bias.shape}"
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_bias, scale=scale)
        return out.transpose(1, 2)  # (B, Nq, H, hd)

    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, xformers.ops = memory_efficient_attention, ops
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_xformers_path_equals_sdpa_path(masked, tiny_unet, strict_fake_xformers):
    add_adapter(tiny_unet, SingLoRAConfig(rank=4, ramp_steps=0), use_xformers=True)
    perturb(tiny_unet)
    with_xformers = run(tiny_unet, masked)
    set_use_xformers(tiny_unet, False)
    torch.testing.assert_close(with_xformers, run(tiny_unet, masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["set_attn_processor", "enable_xformers"])
def test_replacing_processors_keeps_or_refuses_never_drops_the_adapter(how, tiny_unet, strict_fake_xformers):
    """diffusers' own calls that replace every attention processor cannot silently drop an unmerged SingLoRA
    adapter: a stock SDPA / xformers processor switches the adapter's backend, anything else is refused."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    from dreambooth_singlora.adapter import remove_adapter
    from dreambooth_singlora.processor import SingLoRAAttnProcessor

    add_adapter(tiny_unet, SingLoRAConfig(rank=4, ramp_steps=0, init="rank"))
    n = len(trainable_parameters(tiny_unet))
    g = torch.Generator().manual_seed(0)
    x, t, emb = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 48, generator=g)
    before = tiny_unet(x, t, emb).sample
    if how == "set_attn_processor":
        tiny_unet.set_attn_processor(AttnProcessor2_0())
    else:
        from diffusers.models.attention_processor import XFormersAttnProcessor

        for _, attn in attention_modules(tiny_unet):
            attn.set_processor(XFormersAttnProcessor())
    assert len(trainable_parameters(tiny_unet)) == n  # the adapter is still there, still trainable
    assert all(isinstance(a.processor, SingLoRAAttnProcessor) for _, a in attention_modules(tiny_unet))
    assert all(a.processor.use_xformers == (how != "set_attn_processor") for _, a in attention_modules(tiny_unet))
    if how == "set_attn_processor":
        torch.testing.assert_close(tiny_unet(x, t, emb).sample, before, rtol=0, atol=0)  # same processor, same math
    with pytest.raises(UserError, match="would drop the adapter"):
        tiny_unet.set_attn_processor(AttnAddedKVProcessor())
    remove_adapter(tiny_unet)  # remove_adapter still puts the stock processors back
    assert not any(isinstance(a.processor, SingLoRAAttnProcessor) for _, a in attention_modules(tiny_unet))
