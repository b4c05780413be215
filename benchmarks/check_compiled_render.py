"""GPU check of `generate_many --compile` with inductor (the CPU tests trace with dynamo's eager backend).

    python benchmarks/check_compiled_render.py --output X.json

On the tiny random-weight pipeline (dreambooth_singlora.testing), fp16 on the GPU: three SingLoRA
and two LoRA adapters with strong random updates render through their banks, 5 images per batch
(the last batch padded), once eagerly and once compiled. Reports the largest and mean per-pixel
difference between the two renders (inductor fuses and rounds differently, so a few levels of 255
are expected), how many graphs dynamo compiled (one per bank and module is the aim: no recompiles
between batches), and whether the compiled modules are reset afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp/dbsl-check-compile")
    p.add_argument("--output", default="check_compiled_render.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_compiled_render.py checks inductor on a GPU: run it on a machine with CUDA")
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from torch._dynamo.utils import counters

    from dreambooth_singlora.adapter import add_adapter, remove_adapter, save_adapter, set_step, trainable_parameters
    from dreambooth_singlora.config import SingLoRAConfig
    from dreambooth_singlora.generate import GenerateConfig, load_pipeline
    from dreambooth_singlora.generate import generate_many
    from dreambooth_singlora.testing import build_tiny_pipeline

    work = Path(args.work_dir)
    model = build_tiny_pipeline(work / "tiny")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    g = torch.Generator().manual_seed(1)
    adapters = {}
    for name, method, alpha in (("s1", "singlora", 8.0), ("s2", "singlora", 4.0), ("s3", "singlora", 16.0),
                                ("l1", "lora", 8.0), ("l2", "lora", 4.0)):
        add_adapter(unet, SingLoRAConfig(method=method, rank=8, alpha=alpha, ramp_steps=4, init="rank"))
        with torch.no_grad():
            for t in trainable_parameters(unet):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        set_step(unet, 4)
        adapters[name] = save_adapter(unet, work / "adapters" / name, base_model=str(model))
        remove_adapter(unet)
    prompts = {n: ["a photo of sks dog", "a sks dog on the beach", "a sks dog in the snow"] for n in adapters}
    cfg = GenerateConfig(adapter=str(adapters["s1"]), num_images_per_prompt=2, num_inference_steps=10,
                         batch_size=5, merge=False, dtype="fp16")
    pipe = load_pipeline(None, str(model), device="cuda", dtype="fp16", scheduler="ddim")
    eager = generate_many(pipe, adapters, cfg, work / "eager", prompts)
    counters.clear()
    comp = generate_many(pipe, adapters, replace(cfg, compile=True), work / "compiled", prompts)
    frames = dict(counters["stats"])
    diffs = []
    for f in sorted((work / "eager").glob("*/*/*.png")):
        a = np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(work / "compiled" / f.relative_to(work / "eager")).convert("RGB"), dtype=np.int16)
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "images": comp["images"],
        "eager_images": eager["images"], "banks": 2, "batches": len(comp["batch_seconds"]),
        "max_abs_diff_of_255": int(d.max()), "mean_abs_diff_of_255": round(float(d.mean()), 4),
        "dynamo_stats": frames,
        "unique_graphs": frames.get("unique_graphs"),
        "reset_after": pipe.unet._compiled_call_impl is None and pipe.vae.decoder._compiled_call_impl is None,
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
