"""Export an adapter as a standard LoRA file that A1111, ComfyUI and diffusers load.

    python -m dreambooth_singlora.export --adapter out/dog --format kohya --output dog.safetensors

SingLoRA's update (alpha/r) u A[:d_out] A[:d_in]^T is exactly a LoRA with
down = A[:d_in]^T (r x d_in), up = u A[:d_out] (d_out x r), alpha = alpha:
- kohya (the default): lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha. A1111, ComfyUI,
  kohya sd-scripts and diffusers' load_lora_weights all apply it exactly. <name> is the layer's path with "_"
  for "." in the block names kohya itself writes for the base model's family: diffusers' (down_blocks_1_...)
  for SD 1.x and 2.x, the original model's (input_blocks_4_1_...) for SDXL (docs/EXPORT.md: which loader
  reads which, and where in its code).
- diffusers: unet.<path>.lora.down.weight / .lora.up.weight, the scale alpha/r folded into up. Only
  diffusers' load_lora_weights reads it: A1111 skips it (it says so only in its debug log) and kohya's
  merge path skips it without a word, so a UI shows the base model unchanged.
LoRA and LoRA+ adapters export the same way; DoRA exports to diffusers layout with its magnitude vectors
(it has no exact kohya equivalent).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from .config import CONFIG_NAME, WEIGHTS_NAME, SingLoRAConfig, command_parser
from .errors import UserError, cli_entry
from .fileio import atomic_path

FORMATS = ("kohya", "diffusers")


@dataclass(frozen=True)
class KohyaLayout:
    """How a family's LoRA is named in kohya layout: its UNet's block names and the metadata kohya's sd-scripts
    writes (train_network.py: ss_v2 = str(args.v2), ss_base_model_version from model_util.
    get_model_version_str_for_sd1_sd2 or sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0)."""

    family: str
    blocks: str  # "diffusers": down_blocks/mid_block/up_blocks; "original": input_blocks/middle_block/output_blocks
    base_model_version: str  # ss_base_model_version; SD2's gets "_v" for a v-prediction base, as kohya's
    v2: str | None  # ss_v2 ("True" is what A1111 reads as SD2); None: not written (SD1's file stays as it was)

    def names(self, paths) -> dict[str, str]:
        """{diffusers layer path: kohya name without the .lora_down/.lora_up/.alpha suffix} for `paths`."""
        paths = list(paths)
        if self.blocks == "diffusers":
            return {path: "lora_unet_" + path.replace(".", "_") for path in paths}
        per_block = layers_per_block(paths)
        return {path: "lora_unet_" + original_path(path, per_block).replace(".", "_") for path in paths}

    def metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        version = self.base_model_version + ("_v" if self.family == "sd2" and prediction_type == "v_prediction"
                                             else "")
        return ({"ss_v2": self.v2} if self.v2 is not None else {}) | {"ss_base_model_version": version}


KOHYA_LAYOUTS = {
    "sd1": KohyaLayout("sd1", "diffusers", "sd_v1", None),
    "sd2": KohyaLayout("sd2", "diffusers", "sd_v2", "True"),
    "sdxl": KohyaLayout("sdxl", "original", "sdxl_base_v1-0", "False"),
}


def export_layout(family: str | None) -> KohyaLayout:
    """The kohya layout of a family ("sd1" when None: adapters saved before families were recorded)."""
    layout = KOHYA_LAYOUTS.get(family or "sd1")
    if layout is None:
        raise UserError(f"this adapter's config names the model family {family!r}, which export does not know; "
                        f"known: {', '.join(KOHYA_LAYOUTS)}")
    return layout


_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)|mid_block\.attentions\.0\.(.+)")


def original_path(path: str, per_block: int) -> str:
    """The original (Stability / sgm) UNet's module path of a diffusers attention-block path: a down block b's
    attention j is input_blocks.{1 + b (L + 1) + j}.1 (each level holds L ResNet+attention pairs and a
    downsampler), an up block's output_blocks.{b (L + 1) + j}.1 (L + 1 pairs, the upsampler inside the last),
    the middle's middle_block.1; what follows (transformer_blocks.k.attn1.to_q) is the same in both."""
    m = _BLOCK.fullmatch(path)
    if not m:
        raise UserError(f"{path} is not inside a UNet attention block: it has no name in the original model's layout")
    if m[5] is not None:
        return f"middle_block.1.{m[5]}"
    b, j = int(m[2]), int(m[3])
    if m[1] == "down_blocks":
        return f"input_blocks.{1 + b * (per_block + 1) + j}.1.{m[4]}"
    return f"output_blocks.{b * (per_block + 1) + j}.1.{m[4]}"


def layers_per_block(paths) -> int:
    """The UNet's layers_per_block L read off adapted attention paths: down blocks hold L attentions, up blocks
    L + 1. UserError when the two disagree (not a UNet of this shape)."""
    found = {"down_blocks": set(), "up_blocks": set()}
    for path in paths:
        m = _BLOCK.fullmatch(path)
        if m and m[1]:
            found[m[1]].add(int(m[3]))
    down, up = (max(found[k]) + 1 if found[k] else None for k in ("down_blocks", "up_blocks"))
    if down is None and up is None:
        raise UserError("no adapted layer inside the UNet's down or up blocks: the original block numbers are unknown")
    if down is not None and up is not None and up != down + 1:
        raise UserError(f"the adapted layers have {down} attentions per down block but {up} per up block "
                        "(a UNet has one more in each up block): not a Stable Diffusion UNet")
    return down if down is not None else up - 1


def lora_pairs(meta: dict, tensors: dict) -> dict:
    """{layer path: (down (r, d_in), up (d_out, r))} such that delta W = (alpha / r) up @ down."""
    if meta["method"] != "singlora":
        paths = [key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")]
        return {path: (tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]) for path in paths}
    shapes = meta.get("shapes")
    if not shapes:
        raise UserError("this adapter's config has no layer shapes (saved by an older version); "
                        "load it with load_adapter and save it again to export")
    u = SingLoRAConfig.from_dict(meta).u(int(meta.get("step", 0)))  # the ramp where training ended
    pairs = {}
    for key, A in tensors.items():
        path = key[: -len(".A")]
        d_out, d_in = shapes[path]
        if tuple(A.shape) != (max(d_in, d_out), int(meta["rank"])):
            raise UserError(f"{key} is {tuple(A.shape)} but the config says {path} is {d_out} x {d_in} at rank "
                            f"{meta['rank']}: the folder mixes adapters of two base models")
        pairs[path] = (A[:d_in].T.contiguous(), (u * A[:d_out]).contiguous())  # (r, d_in), (d_out, r)
    return pairs


def to_standard_lora(adapter, fmt: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of the adapter at `adapter` as a standard LoRA in layout `fmt`."""
    import torch

    from .adapter import adapter_family, read_adapter
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    meta, tensors = read_adapter(adapter)
    tensors = {k: v.float() for k, v in tensors.items()}
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    dora = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    if dora and fmt == "kohya":
        raise UserError("DoRA has no exact kohya equivalent (its magnitude vectors rescale W0); "
                        "use --format diffusers, which diffusers loads with DoRA intact")
    layout = export_layout(adapter_family(meta))
    pairs = lora_pairs(meta, tensors)
    names = layout.names(pairs) if fmt == "kohya" else {}
    out: dict = {}
    for path, (down, up) in pairs.items():
        if fmt == "kohya":
            name = names[path]
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            out[f"unet.{path}.lora.down.weight"], out[f"unet.{path}.lora.up.weight"] = down, up * (alpha / rank)
    out.update({f"unet.{key}": m for key, m in dora.items()})
    info = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}", **layout.metadata(meta.get("prediction_type")),
            "dreambooth_singlora_method": meta["method"], "dreambooth_singlora_base_model": str(meta.get("base_model"))}
    return {k: v.contiguous() for k, v in out.items()}, info


def export_lora(adapter, fmt: str, output) -> Path:
    """Write the standard-LoRA file (atomically); returns its path."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output must end in .safetensors (got {output.name}); pickles are never written")
    src = Path(adapter)
    own = {p.resolve() for p in (src, src / WEIGHTS_NAME, src / CONFIG_NAME, src.parent / CONFIG_NAME)}
    if output.resolve() in own:
        raise UserError(f"--output {output} is the adapter's own file: the export would overwrite the trained "
                        "weights; write it elsewhere, e.g. --output dog_kohya.safetensors")
    from safetensors.torch import save_file

    tensors, info = to_standard_lora(adapter, fmt)
    with atomic_path(output) as tmp:  # a failed write: WriteError, one line saying why
        save_file(tensors, str(tmp), metadata=info)
    return output


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or command_parser("export", __doc__)
    parser.add_argument("--adapter", required=True, help="adapter folder to export")
    parser.add_argument("--format", default="kohya", choices=FORMATS,
                        help="key layout of the LoRA file: kohya (default) loads in A1111, ComfyUI, kohya sd-scripts "
                             "and diffusers; diffusers loads only in diffusers (the UIs silently ignore it)")
    parser.add_argument("--output", "--output_dir", required=True, dest="output",
                        help="the .safetensors file to write")
    parser.add_argument("--events", default=None,
                        help="write the job's events (started, finished / failed) to this file as JSON lines")
    return parser


@cli_entry
def main(argv=None):
    from .events import job

    args = build_parser().parse_args(argv)
    with job("export", args.events) as events:
        events.emit("started", config={"adapter": args.adapter, "format": args.format, "output": args.output})
        path = export_lora(args.adapter, args.format, args.output)
        events.emit("finished", outputs=[str(path)])
    print(f"wrote {path} ({args.format} LoRA)")


if __name__ == "__main__":
    main()
