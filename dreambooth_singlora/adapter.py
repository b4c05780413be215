"""Put an adapter on a UNet, train it, save it, load it, merge it.

One API for every method: SingLoRA goes in through the attention-processor hook
(`SingLoRAAttnProcessor`); the LoRA, LoRA+ and DoRA baselines go in through PEFT on the same
projections. The saved adapter is `adapter_model.safetensors` + `adapter_config.json`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file

from dataclasses import dataclass, field

from . import __version__
from .base import family_of_unet
from .config import CONFIG_NAME, WEIGHTS_NAME, SingLoRAConfig
from .errors import UserError
from .fileio import atomic_path, write_json_atomic
from .processor import AdapterAttnProcessor, SingLoRAAttnProcessor, key_of, require_xformers
from .singlora import at_least_fp32

logger = logging.getLogger(__name__)

FORMAT = "dreambooth-singlora"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PEFT_NAME = "default"  # the adapter name PEFT's layers hold the LoRA under (bank.py's too)


# --------------------------------------------------------------------------- placing

def attention_modules(unet):
    """(path, Attention) for every attention layer of the UNet, in module order."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]


@dataclass
class AdapterState:
    """Everything the adapter on a UNet holds besides its tensors, in one object (`adapter_state(unet)`): the
    config, the optimizer step its ramp stands at, the strength it is applied with, whether it is merged, and what
    `remove_adapter` puts back."""
    config: SingLoRAConfig
    original_processors: dict = field(default_factory=dict)
    requires_grad: dict = field(default_factory=dict)
    step: int = 0
    strength: float = 1.0
    merged: bool = False

    @property
    def u(self) -> float:
        """u(t) at the adapter's step (1 for the baselines)."""
        return self.config.u(self.step)

    @property
    def coef(self) -> float:
        """(alpha / r) u(step) x strength: the factor of every adapter term."""
        return self.config.coef(self.step, self.strength)


STATE_ATTR = "_dbsl_state"  # the one attribute the adapter puts on a UNet


def adapter_state(unet) -> AdapterState | None:
    """The state of the adapter on `unet`, or None if it has none."""
    return getattr(unet, STATE_ATTR, None)


def get_config(unet) -> SingLoRAConfig | None:
    """The config of the adapter on `unet`, or None."""
    state = adapter_state(unet)
    return state.config if state is not None else None


def _require_config(unet, purpose: str = "") -> SingLoRAConfig:
    config = get_config(unet)
    if config is None:
        raise UserError(f"this UNet has no adapter{purpose}")
    return config


def set_processor(attn, processor) -> None:
    """Put `processor` on `attn`, past the guard that `add_adapter` installs (the project's own calls)."""
    type(attn).set_processor(attn, processor)


def _guarded_set_processor(attn, processor, *args, **kwargs) -> None:
    """`attn.set_processor` while an adapter processor is on `attn` (diffusers' `unet.set_attn_processor`,
    `enable_xformers_memory_efficient_attention`, ... call it): a stock SDPA or xformers processor only
    switches the adapter processor's attention backend, so the adapter survives; any other processor
    would silently drop the adapter, so it is refused."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    current = attn.processor
    if isinstance(processor, AdapterAttnProcessor) or not isinstance(current, AdapterAttnProcessor):
        return type(attn).set_processor(attn, processor, *args, **kwargs)
    if not isinstance(processor, (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)):
        raise UserError(f"setting {type(processor).__name__} on a UNet with an unmerged adapter would drop the "
                        "adapter: merge_adapter(unet) or remove_adapter(unet) first (SDPA and xformers processors "
                        "are fine: they switch the adapter's attention backend)")
    _set_backend(current, isinstance(processor, XFormersAttnProcessor))


def _set_backend(proc, use_xformers: bool) -> None:
    """Switch an adapter processor (and the stock processor a LoRA bank wraps) between SDPA and xformers."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    proc.use_xformers = use_xformers
    inner = getattr(proc, "inner", None)
    if isinstance(inner, AdapterAttnProcessor):
        inner.use_xformers = use_xformers
    elif inner is not None:
        proc.inner = XFormersAttnProcessor() if use_xformers else AttnProcessor2_0()


def add_adapter(unet, config: SingLoRAConfig, *, use_xformers: bool = False) -> None:
    """Freeze `unet` and place the adapter `config` describes on its attention projections (self- and cross-)."""
    if get_config(unet) is not None:
        raise UserError(f"this UNet already has a {get_config(unet).method} adapter; "
                        "call remove_adapter(unet) first or start from a fresh UNet")
    if getattr(unet, "peft_config", None):
        raise UserError("this UNet already has PEFT adapters; start from a fresh UNet")
    attns = attention_modules(unet)
    if not attns:
        raise UserError(f"{type(unet).__name__} has no diffusers Attention layers to adapt")
    if use_xformers:
        require_xformers()
    state = AdapterState(config, original_processors={name: a.processor for name, a in attns},
                         requires_grad={name: p.requires_grad for name, p in unet.named_parameters()})
    unet.requires_grad_(False)
    if config.method == "singlora":
        ref = next(unet.parameters())
        for _, attn in attns:
            proc = SingLoRAAttnProcessor(attn, config.rank, config.alpha, config.init, config.target_modules)
            set_processor(attn, proc.to(device=ref.device))  # A stays fp32 whatever the UNet's dtype
            attn.set_processor = functools.partial(_guarded_set_processor, attn)
    else:
        from peft import LoraConfig

        # init "gaussian" as diffusers' DreamBooth LoRA script; B = 0 so the start is the base model
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.target_modules),
                                    use_dora=config.method == "dora"), adapter_name=PEFT_NAME)
        for p in trainable_parameters(unet):
            p.data = at_least_fp32(p.data)
    setattr(unet, STATE_ATTR, state)
    if use_xformers:  # with PEFT's layers (in to_q / to_k) only the attention itself changes
        set_use_xformers(unet, True)
    set_step(unet, 0)


add_singlora = add_adapter  # the name the paper's readers look for; every method goes through it


def remove_adapter(unet) -> None:
    """Take the adapter off again (unmerging it first if merged): the UNet is as it was before add_adapter."""
    config = get_config(unet)
    if config is None:
        return
    if is_merged(unet):
        unmerge_adapter(unet)
    if config.method != "singlora":
        unet.unload_lora()
    for name, attn in attention_modules(unet):
        attn.__dict__.pop("set_processor", None)  # the guard add_adapter installed
        set_processor(attn, adapter_state(unet).original_processors[name])
    for name, p in unet.named_parameters():
        p.requires_grad_(adapter_state(unet).requires_grad.get(name, p.requires_grad))
    vars(unet).pop(STATE_ATTR, None)


def singlora_processor(attn) -> SingLoRAAttnProcessor | None:
    """The SingLoRA processor of `attn`: its processor, or the one an adapter bank wraps; else None."""
    proc = getattr(attn.processor, "inner", attn.processor)
    return proc if isinstance(proc, SingLoRAAttnProcessor) else None


def singlora_layers(unet):
    """(attention path, target, SingLoRA module) for every SingLoRA term on `unet`."""
    return [(name, t, proc.adapters[key_of(t)]) for name, attn in attention_modules(unet)
            if (proc := singlora_processor(attn)) is not None for t in proc.targets]


def layer_shapes(unet) -> dict[str, list[int]]:
    """{"<attention path>.<target>": [d_out, d_in]} of every adapted projection (what export needs)."""
    return {f"{name}.{t}": [attn.get_submodule(t).out_features, attn.get_submodule(t).in_features]
            for name, attn in attention_modules(unet) for t in get_config(unet).target_modules}


def trainable_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def set_step(unet, step: int) -> float:
    """Set the SingLoRA ramp from the optimizer step count; returns u. No-op (u = 1) for baselines."""
    _require_config(unet)
    if is_merged(unet):
        raise UserError("the adapter is merged into the weights: unmerge_adapter(unet) before setting the step")
    state = adapter_state(unet)
    state.step = step
    _apply_coef(unet)
    return state.u


def set_strength(unet, strength: float) -> None:
    """Apply the adapter at `strength` x its trained update (1 = as trained, 0 = the base model): SingLoRA's
    u -> strength x u, LoRA's and DoRA's scaling x strength (PEFT's set_scale)."""
    _require_config(unet)
    if is_merged(unet):
        raise UserError("the adapter is merged into the weights: unmerge_adapter(unet) before setting the strength")
    adapter_state(unet).strength = float(strength)
    _apply_coef(unet, peft_scale=True)


def _apply_coef(unet, peft_scale: bool = False) -> None:
    """Put the state's step and strength into the layers (PEFT's scaling too with `peft_scale`)."""
    state = adapter_state(unet)
    for _, _, layer in singlora_layers(unet):
        layer.set_ramp(state.u * state.strength)
    if peft_scale and state.config.method != "singlora":
        from peft.tuners.lora import LoraLayer

        for m in unet.modules():
            if isinstance(m, LoraLayer):
                m.set_scale(PEFT_NAME, state.strength)


def set_use_xformers(unet, enabled: bool) -> None:
    """Switch the adapted UNet's attention between SDPA and xformers (UserError if xformers is missing)."""
    _require_config(unet)
    if enabled:
        require_xformers()
    from diffusers.models.attention_processor import XFormersAttnProcessor

    for name, attn in attention_modules(unet):
        if isinstance(attn.processor, AdapterAttnProcessor):  # SingLoRA's, or an adapter bank's (LoRA too)
            _set_backend(attn.processor, enabled)
        else:
            set_processor(attn, XFormersAttnProcessor() if enabled else adapter_state(unet).original_processors[name])


# --------------------------------------------------------------------------- state

def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors under architecture-level names (no processor/PEFT internals)."""
    config = _require_config(unet)
    if config.method == "singlora":
        return {f"{path}.{target}.A": layer.A for path, target, layer in singlora_layers(unet)}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=PEFT_NAME)


def load_adapter_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the adapter on `unet`, after checking every key and shape fits."""
    own = adapter_state_dict(unet)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which this UNet lacks"
        raise UserError(f"adapter does not fit this UNet ({len(missing)} missing, {len(extra)} unexpected "
                        f"tensors; {what}): it was trained for another architecture or target_modules")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"adapter does not fit this UNet: {k} is {tuple(v.shape)}, this UNet needs "
                            f"{tuple(own[k].shape)} (trained on another base model?)")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def adapter_family(meta: dict) -> str:
    """The family an adapter's config says it was trained on (adapters of 0.1 record none: they were SD 1.x's)."""
    return meta.get("family") or "sd1"


def save_adapter(unet, output_dir, *, base_model: str | None = None, extra: dict | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json to `output_dir`, each atomically. The config (with the
    step the ramp ended at, so that generation is exact) is also in the safetensors metadata: the weights file alone
    is self-describing. It names the UNet's family (generate refuses the adapter on another family's base); `extra`
    adds to it (the trainer's: the base's prediction_type, the run's settings)."""
    config = _require_config(unet, " to save")
    if is_merged(unet):
        raise UserError("the adapter is merged into the weights; unmerge_adapter(unet) before saving")
    family = {"family": family_of_unet(unet.config).name} if hasattr(unet, "config") else {}  # read by generate
    meta = {**family, **(extra or {}), "format": FORMAT, "version": __version__, **SingLoRAConfig.to_dict(config),
            "step": adapter_state(unet).step, "base_model": base_model, "shapes": layer_shapes(unet)}
    meta["u"] = saved_u(meta)  # recorded for people to read; every reader derives u from the step
    tensors = {k: at_least_fp32(v.detach().cpu()).contiguous() for k, v in adapter_state_dict(unet).items()}
    out = Path(output_dir)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", FORMAT: json.dumps(meta)})
    write_json_atomic(out / CONFIG_NAME, meta)
    return out


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter folder (or its .safetensors file): (config dict, tensors); UserError names a fault."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"refusing to load {path}: pickle files can run code; "
                        f"give the folder with {WEIGHTS_NAME} instead")
    folder, weights = (path.parent, path) if path.suffix == ".safetensors" else (path, path / WEIGHTS_NAME)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"adapter folder {folder} {what} (expected a folder with {WEIGHTS_NAME} and {CONFIG_NAME})")
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = (f"; found pickle file(s) {', '.join(pickles)}, which are never loaded (they can run code)"
                if pickles else "")
        raise UserError(f"{folder} has no {weights.name}{hint}")
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise UserError(f"{folder} has no {CONFIG_NAME}: without it the adapter's method, rank and ramp are unknown")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{cfg_file} is not a {FORMAT} adapter config (a standard LoRA? load those with "
                        "pipe.load_lora_weights)")
    try:
        tensors = load_file(str(weights))
        with safetensors.safe_open(str(weights), "pt") as f:
            file_meta = json.loads((f.metadata() or {}).get(FORMAT, "{}"))
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"{weights} is corrupt or truncated ({type(e).__name__}: {e})") from None
    for key in ("method", "rank", "alpha", "init", "ramp_steps", "target_modules"):
        if file_meta and file_meta.get(key) != meta.get(key):
            raise UserError(f"{cfg_file} and {weights.name} disagree on {key} ({meta.get(key)!r} vs "
                            f"{file_meta.get(key)!r}); the folder mixes two adapters")
    if file_meta:  # the weights file is the commit point of a save: its step and u win
        meta.update({k: file_meta[k] for k in ("step", "u") if k in file_meta})
    try:
        SingLoRAConfig.from_dict(meta)
    except (UserError, TypeError) as e:
        raise UserError(f"bad adapter config in {path}: {e}") from None
    if "u" in meta and not math.isclose(float(meta["u"]), saved_u(meta), rel_tol=1e-9, abs_tol=1e-12):
        raise UserError(f"{cfg_file} records u = {meta['u']} but step {meta.get('step')} with ramp_steps "
                        f"{meta.get('ramp_steps')} gives u = {saved_u(meta)}; the config was edited or is corrupt")
    return meta, tensors


def saved_u(meta: dict) -> float:
    """The u(t) a saved adapter ended at (its config's rule at its step): load_adapter, export and the bank all
    derive u from the step."""
    return SingLoRAConfig.from_dict(meta).u(int(meta.get("step", 0)))


def load_adapter(unet, path, *, use_xformers: bool = False) -> SingLoRAConfig:
    """Place the adapter saved at `path` on a UNet without one; on any error the UNet is unchanged."""
    meta, tensors = read_adapter(path)
    config = SingLoRAConfig.from_dict(meta)  # checked by read_adapter
    add_adapter(unet, config, use_xformers=use_xformers)
    try:
        saved, ours = meta.get("shapes"), layer_shapes(unet)
        bad = [k for k in (saved or {}) if list(saved[k]) != ours.get(k)]
        if bad:  # SingLoRA's A is (max(d_in, d_out), r): a changed d_in alone can hide from the tensor shapes
            raise UserError(f"adapter does not fit this UNet: {bad[0]} is (d_out, d_in) = {tuple(saved[bad[0]])} "
                            f"in the adapter, {tuple(ours.get(bad[0]) or ())} here (trained on another base model?)")
        load_adapter_state_dict(unet, tensors)
        set_step(unet, int(meta.get("step", 0)))
    except BaseException:
        remove_adapter(unet)
        raise
    for p in trainable_parameters(unet):
        p.requires_grad_(False)  # loaded for inference; the trainer resumes from its checkpoints
    return config


# --------------------------------------------------------------------------- merging

def is_merged(unet) -> bool:
    state = adapter_state(unet)
    return state is not None and state.merged


def merge_adapter(unet, *, safe: bool = True) -> None:
    """Fold the adapter into the base weights, so inference costs what the base model costs. safe=True refuses
    (UserError, nothing changed) if any merged weight is non-finite. Merging a merged UNet: no-op with a warning."""
    config = _require_config(unet, " to merge")
    if is_merged(unet):
        logger.warning("adapter already merged; nothing to do")
        return
    if config.method == "singlora":
        _fold_singlora(unet, 1, safe)
    else:
        from peft.tuners.tuners_utils import BaseTunerLayer

        done = []  # (layer, its weight before merging): PEFT's safe_merge checks one layer at a time
        for m in (m for m in unet.modules() if isinstance(m, BaseTunerLayer)):
            before = m.get_base_layer().weight.detach().clone() if safe else None
            try:
                m.merge(safe_merge=safe)
            except ValueError:  # non-finite: put the layers merged so far back exactly
                with torch.no_grad():
                    for layer, weight in done:
                        layer.unmerge()
                        layer.get_base_layer().weight.copy_(weight)
                raise UserError("merge refused: the adapter gives non-finite weights; nothing changed") from None
            done.append((m, before))
    adapter_state(unet).merged = True


def unmerge_adapter(unet) -> None:
    """Undo merge_adapter (exact up to the base weights' dtype rounding). Unmerged: no-op with a warning."""
    if not is_merged(unet):  # merged implies an adapter: merge_adapter needs one, remove_adapter unmerges first
        logger.warning("adapter not merged; nothing to do")
        return
    if get_config(unet).method == "singlora":
        _fold_singlora(unet, -1, safe=False)
    else:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in (m for m in unet.modules() if isinstance(m, BaseTunerLayer)):
            m.unmerge()
    adapter_state(unet).merged = False


@torch.no_grad()
def _fold_singlora(unet, sign: int, safe: bool) -> None:
    """Add (sign 1) or subtract (-1) each SingLoRA delta W to its base weight, every new weight computed
    before any is written: with `safe`, a non-finite one refuses the merge with nothing changed."""
    new = []
    for path, target, layer in singlora_layers(unet):
        weight = unet.get_submodule(f"{path}.{target}").weight
        new.append((weight, (at_least_fp32(weight) + sign * layer.delta_weight()).to(weight.dtype)))
        if safe and not torch.isfinite(new[-1][1]).all():
            raise UserError(f"merge refused: {path}.{target} would get non-finite weights; nothing changed")
    for weight, value in new:
        weight.copy_(value)
    for _, attn in attention_modules(unet):
        singlora_processor(attn).merged = sign > 0


def count_parameters(unet) -> int:
    return sum(p.numel() for p in trainable_parameters(unet))
