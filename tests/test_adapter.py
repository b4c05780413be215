"""The adapter API on real UNets: parameter counts on SD1.5, save/load, merge, bad input, atomic saves."""

import errno
import json
import random
import shutil

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel

from dreambooth_singlora import adapter as adapter_mod
from dreambooth_singlora.adapter import (adapter_state, 
    CONFIG_NAME, WEIGHTS_NAME, add_adapter, attention_modules, count_parameters, get_config, load_adapter,
    merge_adapter, remove_adapter, save_adapter, set_step, singlora_layers, trainable_parameters,
    unmerge_adapter,
)
from dreambooth_singlora.config import METHODS, SingLoRAConfig
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.testing import SD15_UNET_CONFIG, TINY_UNET_CONFIG


def inputs():
    """One fixed batch for the tiny UNet: latents (2, 4, 8, 8), timesteps, text states (2, 5, 48)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 48, generator=g)


@torch.no_grad()
def run(unet) -> torch.Tensor:
    sample, t, text = inputs()
    return unet(sample, t, text).sample


@torch.no_grad()
def perturb(unet, seed=0, std=0.1):
    """Move every adapter tensor off its init (LoRA's B starts at 0), so a broken load shows."""
    g = torch.Generator().manual_seed(seed)
    for p in trainable_parameters(unet):
        p.add_(torch.randn(p.shape, generator=g) * std)


def base_weights(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k and ".processor." not in k}


def lora_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@pytest.fixture
def make_unet(tiny_pipeline):
    """A factory of fresh tiny UNets with the same base weights (through from_pretrained)."""
    return lambda: UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")


# --------------------------------------------------------------------------- counts on SD1.5

@pytest.mark.parametrize("method,count", [
    ("singlora", 422_400),  # 64 A matrices (max(d_in, d_out), 8)
    ("lora", 797_184),  # 64 (A, B) pairs, 8 (d_in + d_out) each
    ("loraplus", 797_184),  # LoRA's parameters; only B's learning rate differs
    ("dora", 797_184 + 49_920),  # + a magnitude vector of d_out per projection
])
def test_sd15_parameter_counts(method, count):
    with torch.device("meta"):  # SD1.5's architecture, no weights: fast and memoryless
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert len(attention_modules(unet)) == 32
    add_adapter(unet, SingLoRAConfig(method=method, rank=8))
    adapted = singlora_layers(unet) if method == "singlora" else lora_layers(unet)
    assert len(adapted) == 64
    assert count_parameters(unet) == count


# --------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_into_a_fresh_unet_gives_the_same_output(method, make_unet, tmp_path):
    unet = make_unet()
    base = run(unet)
    add_adapter(unet, SingLoRAConfig(method=method, rank=4, ramp_steps=10))
    set_step(unet, 3)  # SingLoRA: u = 0.3, saved and restored
    perturb(unet)
    out = run(unet)
    assert (out - base).abs().max() > 1e-3  # the adapter changes the output, so a lost one shows
    save_adapter(unet, tmp_path, base_model="tiny")

    fresh = make_unet()
    config = load_adapter(fresh, tmp_path)
    assert config.method == method and config.rank == 4
    assert torch.equal(run(fresh), out)
    assert adapter_state(fresh).step == 3
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference
    if method == "singlora":
        for (_, _, a), (_, _, b) in zip(singlora_layers(unet), singlora_layers(fresh)):
            assert torch.equal(a.A, b.A) and a.u.item() == b.u.item() == pytest.approx(0.3)


def test_load_from_the_weights_file_path(make_unet, tmp_path):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(rank=4, ramp_steps=0))
    perturb(unet)
    save_adapter(unet, tmp_path)
    fresh = make_unet()
    load_adapter(fresh, tmp_path / WEIGHTS_NAME)
    assert torch.equal(run(fresh), run(unet))


def test_saved_config_records_the_run(make_unet, tmp_path):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(rank=4, alpha=2.0, ramp_steps=20, init="rank"))
    set_step(unet, 5)
    save_adapter(unet, tmp_path, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {"method", "rank", "alpha", "init", "ramp_steps", "step", "u", "target_modules", "base_model",
            "version"} <= set(cfg)
    assert (cfg["method"], cfg["rank"], cfg["alpha"], cfg["init"], cfg["ramp_steps"]) == ("singlora", 4, 2.0, "rank", 20)
    assert (cfg["step"], cfg["u"]) == (5, 0.25)
    assert cfg["target_modules"] == ["to_q", "to_k"]
    assert cfg["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with safetensors.safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:  # the weights describe themselves
        assert json.loads(f.metadata()["dreambooth-singlora"]) == cfg
        assert len(list(f.keys())) == 2 * len(attention_modules(unet))
    assert not [p.name for p in tmp_path.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME)]


def test_extra_fields_cannot_overwrite_the_adapters_own(make_unet, tmp_path):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(rank=4))
    save_adapter(unet, tmp_path, extra={"method": "lora", "rank": 99, "note": "kept"})
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (cfg["method"], cfg["rank"], cfg["note"]) == ("singlora", 4, "kept")


# --------------------------------------------------------------------------- add / merge / step

@pytest.mark.parametrize("first,second", [("singlora", "singlora"), ("singlora", "lora"), ("lora", "singlora"),
                                          ("dora", "dora")])
def test_a_second_add_raises(first, second, make_unet):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(method=first))
    n = count_parameters(unet)
    with pytest.raises(UserError, match="already has"):
        add_adapter(unet, SingLoRAConfig(method=second))
    assert get_config(unet).method == first and count_parameters(unet) == n


@pytest.mark.parametrize("method", METHODS)
def test_merge_twice_and_unmerge_twice_are_no_ops(method, make_unet):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(method=method, rank=4, ramp_steps=0))
    perturb(unet)
    unmerged = run(unet)
    unmerge_adapter(unet)  # not merged: nothing happens
    assert torch.equal(run(unet), unmerged)
    merge_adapter(unet)
    merged = run(unet)
    weights = base_weights(unet)
    merge_adapter(unet)  # already merged: nothing happens
    assert torch.equal(run(unet), merged)
    assert all(torch.equal(v, weights[k]) for k, v in base_weights(unet).items())
    unmerge_adapter(unet)
    unmerge_adapter(unet)
    torch.testing.assert_close(run(unet), unmerged, rtol=1e-5, atol=1e-5)  # fp32 rounding of W + dW - dW


def test_set_step_while_merged_raises(make_unet):
    unet = make_unet()
    with pytest.raises(UserError, match="no adapter"):
        set_step(unet, 0)
    add_adapter(unet, SingLoRAConfig(ramp_steps=10))
    set_step(unet, 20)  # u = 1 already: a later step does not change u, and still must not pass
    merge_adapter(unet)
    for step in (21, 5):
        with pytest.raises(UserError, match="merged"):
            set_step(unet, step)
    assert adapter_state(unet).step == 20
    unmerge_adapter(unet)
    assert set_step(unet, 5) == 0.5


@pytest.mark.parametrize("method", METHODS)
def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(method, make_unet):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(method=method, rank=4, ramp_steps=0))
    with torch.no_grad():
        trainable_parameters(unet)[-1].view(-1)[0] = float("inf")  # the last layer: the others come first
    weights = base_weights(unet)
    with pytest.raises(UserError, match="non-finite"):
        merge_adapter(unet, safe=True)
    assert not adapter_mod.is_merged(unet)
    assert all(torch.equal(v, weights[k]) for k, v in base_weights(unet).items())
    if method == "singlora":
        assert not any(a.processor.merged for _, a in attention_modules(unet))
    else:
        assert not any(m.merged for m in lora_layers(unet))


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_stock_unet_even_when_merged(method, make_unet):
    unet = make_unet()
    base, stock = run(unet), {n: a.processor for n, a in attention_modules(unet)}
    add_adapter(unet, SingLoRAConfig(method=method, rank=4, ramp_steps=0))
    perturb(unet)
    merge_adapter(unet)
    remove_adapter(unet)
    assert get_config(unet) is None and not getattr(unet, "peft_config", None)
    assert {n: a.processor for n, a in attention_modules(unet)} == stock
    torch.testing.assert_close(run(unet), base, rtol=1e-5, atol=1e-5)
    add_adapter(unet, SingLoRAConfig(method=method))  # and it takes a new adapter
    assert not adapter_mod.is_merged(unet)


# --------------------------------------------------------------------------- bad input to load_adapter

@pytest.fixture(scope="module")
def good_adapter(tiny_pipeline, tmp_path_factory):
    """A valid SingLoRA adapter saved from the tiny UNet."""
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    add_adapter(unet, SingLoRAConfig(rank=4))
    perturb(unet)
    return save_adapter(unet, tmp_path_factory.mktemp("good-adapter"))


def other_architecture(method):
    """An adapter saved from a UNet with another cross_attention_dim (32 instead of 48)."""
    def make(good, tmp):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 32})
        add_adapter(unet, SingLoRAConfig(method=method, rank=4))
        return save_adapter(unet, tmp / "other")
    return make


def with_config(**changes):
    def make(good, tmp):
        cfg = json.loads((good / CONFIG_NAME).read_text())
        (good / CONFIG_NAME).write_text(json.dumps({**cfg, **changes}))
        return good
    return make


def broken_weights(how):
    def make(good, tmp):
        f = good / WEIGHTS_NAME
        data = f.read_bytes()
        f.write_bytes(random.Random(0).randbytes(len(data)) if how == "corrupt" else data[: len(data) // 2])
        return good
    return make


def without_config(good, tmp):
    (good / CONFIG_NAME).unlink()
    return good


def only_a_pickle(good, tmp):
    folder = tmp / "pickled"
    folder.mkdir()
    torch.save(safetensors.torch.load_file(good / WEIGHTS_NAME), folder / "adapter_model.bin")
    return folder


def a_bin_path(good, tmp):
    return only_a_pickle(good, tmp) / "adapter_model.bin"


def config_text(text):
    def make(good, tmp):
        (good / CONFIG_NAME).write_text(text)
        return good
    return make


BAD_ADAPTERS = [
    ("other-cross-attention-dim", other_architecture("singlora"), "does not fit"),
    ("other-cross-attention-dim-lora", other_architecture("lora"), "does not fit"),
    ("method-mismatch", with_config(method="lora"), "disagree on method"),
    ("alpha-mismatch", with_config(alpha=1.0), "disagree on alpha"),
    ("corrupt-weights", broken_weights("corrupt"), "corrupt or truncated"),
    ("truncated-weights", broken_weights("truncated"), "corrupt or truncated"),
    ("no-config", without_config, f"has no {CONFIG_NAME}"),
    ("config-not-json", config_text("{oops"), "not valid JSON"),
    ("pickle-only-folder", only_a_pickle, r"no adapter_model\.safetensors; found pickle"),
    ("bin-path", a_bin_path, "refusing to load .*pickle"),
    ("missing-folder", lambda g, t: t / "nowhere", "does not exist"),
    ("not-our-config", config_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["to_q"]})),
     "not a dreambooth-singlora adapter config"),
]


@pytest.mark.parametrize("make_bad,message", [c[1:] for c in BAD_ADAPTERS], ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter_gives_one_clear_error_and_leaves_the_unet_unchanged(make_bad, message, good_adapter,
                                                                         make_unet, tmp_path):
    good = tmp_path / "adapter"
    shutil.copytree(good_adapter, good)
    path = make_bad(good, tmp_path)
    unet = make_unet()
    before, names = run(unet), [n for n, _ in unet.named_parameters()]
    grads, stock = [p.requires_grad for p in unet.parameters()], {n: a.processor for n, a in attention_modules(unet)}
    with pytest.raises(UserError, match=message):
        load_adapter(unet, path)
    assert get_config(unet) is None and not getattr(unet, "peft_config", None)
    assert {n: a.processor for n, a in attention_modules(unet)} == stock
    assert [n for n, _ in unet.named_parameters()] == names
    assert [p.requires_grad for p in unet.parameters()] == grads
    assert torch.equal(run(unet), before)


# --------------------------------------------------------------------------- atomic save

def test_a_save_that_fails_mid_write_keeps_the_previous_adapter(make_unet, tmp_path, monkeypatch):
    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(rank=4, ramp_steps=10))
    set_step(unet, 4)
    perturb(unet)
    good_out = run(unet)
    save_adapter(unet, tmp_path)
    good_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(tensors, filename, metadata=None):  # half a file, then the disk is full
        with open(filename, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata)[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    monkeypatch.setattr(adapter_mod, "save_file", disk_full)
    perturb(unet, seed=1)
    set_step(unet, 9)
    from dreambooth_singlora.fileio import WriteError

    with pytest.raises(WriteError, match="disk full") as e:  # one line for the CLI, naming the file
        save_adapter(unet, tmp_path)
    assert e.value.disk_full and e.value.path.name == WEIGHTS_NAME
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == good_bytes  # no tmp file left either

    (tmp_path / f"{WEIGHTS_NAME}.tmp-12345").write_bytes(b"half a file from a killed save")
    fresh = make_unet()
    load_adapter(fresh, tmp_path)  # reads the committed file only, never a stray tmp
    assert adapter_state(fresh).step == 4
    assert torch.equal(run(fresh), good_out)


def test_u_has_one_source_the_step(make_unet, tmp_path):
    """u is derived from (step, ramp_steps) everywhere: loading and export agree with the ramp at the saved step,
    whatever a hand-edited adapter_config.json says."""
    import json

    from dreambooth_singlora.export import lora_pairs
    from dreambooth_singlora.adapter import read_adapter

    unet = make_unet()
    add_adapter(unet, SingLoRAConfig(rank=4, ramp_steps=10))
    set_step(unet, 5)
    save_adapter(unet, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["u"] == 0.5
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, "u": 1.0}))
    fresh = make_unet()
    load_adapter(fresh, tmp_path)
    assert adapter_state(fresh).u == 0.5
    meta, tensors = read_adapter(tmp_path)
    key = next(iter(tensors))
    down, up = lora_pairs(meta, tensors)[key[:-len(".A")]]
    d_out = up.shape[0]
    torch.testing.assert_close(up, 0.5 * tensors[key][:d_out], rtol=0, atol=0)
