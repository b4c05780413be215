"""The adapter config: one dataclass for the CLI, the Python API and adapter_config.json.

Every field's help text lives in its metadata; `add_arguments` turns a config dataclass into
argparse flags and `from_args` back, so the CLI and the API can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields

from .errors import UserError
from .singlora import INITS

METHODS = ("singlora", "lora", "loraplus", "dora")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class SingLoRAConfig:
    """Which adapter to place on the UNet's attention projections, and how."""

    method: str = field(default="singlora", metadata=_help(
        f"adapter: {', '.join(METHODS)} (lora/loraplus/dora through PEFT)", choices=METHODS))
    rank: int = field(default=8, metadata=_help("adapter rank r"))
    alpha: typing.Optional[float] = field(default=None, metadata=_help(
        "scale numerator: delta W is multiplied by alpha / r (default: alpha = rank, scale 1)"))
    ramp_steps: int = field(default=40, metadata=_help(
        "SingLoRA ramp T: u(t) = min(t / T, 1) over optimizer steps; 0 = no ramp. "
        "Default 40 = 10%% of the default 400 steps"))
    init: str = field(default="width", metadata=_help(
        "SingLoRA init of A: 'width' (fan-in = layer width, entries ~1/d as PEFT's LoRA A) "
        "or 'rank' (fan-in = r, the public implementations' choice)", choices=INITS))
    target_modules: typing.Tuple[str, ...] = field(default=("to_q", "to_k"), metadata=_help(
        f"attention projections to adapt, from {', '.join(TARGETS)}"))
    loraplus_lr_ratio: float = field(default=16.0, metadata=_help(
        "LoRA+ only: B's learning rate = learning_rate x this ratio"))

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"rank must be a positive integer, got {self.rank!r}")
        if self.ramp_steps < 0:
            raise UserError(f"ramp_steps must be >= 0 (0 = no ramp), got {self.ramp_steps}")
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        bad = [t for t in self.target_modules if t not in TARGETS]
        if bad or not self.target_modules:
            raise UserError(f"bad target_modules {list(self.target_modules)}; choose from {', '.join(TARGETS)}")
        if self.loraplus_lr_ratio <= 0:
            raise UserError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(SingLoRAConfig)} | {
            "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "SingLoRAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- CLI <-> dataclass

def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one --flag per field of the dataclass `cls`, typed and documented from the field."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"help": f.metadata.get("help", ""), "default": default}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list):
            kw.update(nargs="+", type=typing.get_args(tp)[0])
        else:
            kw["type"] = tp
        parser.add_argument(f"--{f.name}", **kw)


def from_args(cls, ns: argparse.Namespace):
    """Build the dataclass `cls` from the parsed flags (fields without a flag keep their default)."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
