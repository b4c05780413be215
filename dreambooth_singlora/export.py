"""Export an adapter as a standard LoRA file that A1111, ComfyUI and diffusers load.

    python -m dreambooth_singlora.export --adapter out/dog --format kohya --output dog.safetensors

SingLoRA's update (alpha/r) u A[:d_out] A[:d_in]^T is exactly a LoRA with
down = A[:d_in]^T (r x d_in), up = u A[:d_out] (d_out x r), alpha = alpha:
- kohya (the default): lora_unet_<path>.lora_down.weight / .lora_up.weight / .alpha. A1111, ComfyUI,
  kohya sd-scripts and diffusers' load_lora_weights all apply it exactly.
- diffusers: unet.<path>.lora.down.weight / .lora.up.weight, the scale alpha/r folded into up. Only
  diffusers' load_lora_weights reads it: A1111 skips it (it says so only in its debug log) and kohya's
  merge path skips it without a word, so a UI shows the base model unchanged.
LoRA and LoRA+ adapters export the same way; DoRA exports to diffusers layout with its magnitude vectors
(it has no exact kohya equivalent).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import CONFIG_NAME, WEIGHTS_NAME, command_parser
from .errors import UserError, cli_entry
from .fileio import atomic_path

FORMATS = ("kohya", "diffusers")


def lora_pairs(meta: dict, tensors: dict) -> dict:
    """{layer path: (down (r, d_in), up (d_out, r))} such that delta W = (alpha / r) up @ down."""
    from .adapter import saved_u
    if meta["method"] != "singlora":
        paths = [key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")]
        return {path: (tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]) for path in paths}
    shapes = meta.get("shapes")
    if not shapes:
        raise UserError("this adapter's config has no layer shapes (saved by an older version); "
                        "load it with load_adapter and save it again to export")
    pairs = {}
    for key, A in tensors.items():
        path = key[: -len(".A")]
        d_out, d_in = shapes[path]
        if tuple(A.shape) != (max(d_in, d_out), int(meta["rank"])):
            raise UserError(f"{key} is {tuple(A.shape)} but the config says {path} is {d_out} x {d_in} at rank "
                            f"{meta['rank']}: the folder mixes adapters of two base models")
        pairs[path] = (A[:d_in].T.contiguous(), (saved_u(meta) * A[:d_out]).contiguous())  # (r, d_in), (d_out, r)
    return pairs


def to_standard_lora(adapter, fmt: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of the adapter at `adapter` as a standard LoRA in layout `fmt`."""
    import torch

    from .adapter import read_adapter
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    meta, tensors = read_adapter(adapter)
    tensors = {k: v.float() for k, v in tensors.items()}
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    dora = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    if dora and fmt == "kohya":
        raise UserError("DoRA has no exact kohya equivalent (its magnitude vectors rescale W0); "
                        "use --format diffusers, which diffusers loads with DoRA intact")
    out: dict = {}
    for path, (down, up) in lora_pairs(meta, tensors).items():
        if fmt == "kohya":
            name = "lora_unet_" + path.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            out[f"unet.{path}.lora.down.weight"], out[f"unet.{path}.lora.up.weight"] = down, up * (alpha / rank)
    out.update({f"unet.{key}": m for key, m in dora.items()})
    info = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}", "ss_base_model_version": "sd_v1",
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
    return parser


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    path = export_lora(args.adapter, args.format, args.output)
    print(f"wrote {path} ({args.format} LoRA)")


if __name__ == "__main__":
    main()
