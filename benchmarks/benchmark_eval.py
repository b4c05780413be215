"""Scoring speed: 3,000 generated images (30 subjects x 25 prompts x 4) + the 158 real images.

    python benchmarks/benchmark_eval.py --dataset_dir DIR --output benchmark_eval.json

The encoders are the protocol's real architectures (open_clip ViT-B/32 with QuickGELU, timm DINO
ViT-S/16) with random weights, saved to local files and loaded through the same loaders users
use with real weights (speed does not depend on the values). The "generations" are smooth random
512 x 512 PNGs in the layout `dreambooth-singlora eval score` reads. Times the whole `score_folder` call:
reading and preprocessing every image, both encoders, the text tower, aggregation.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, size: int = 512, per_prompt: int = 4) -> int:
    from dreambooth_singlora.prompts import slugify, subjects

    jobs = [(root / s / slugify(p) / f"{k}.png", hash((s, p, k)) & 0xFFFF)
            for s, subj in subjects().items() for p in subj.eval_prompts() for k in range(per_prompt)]

    def one(job):
        path, seed = job
        rng = np.random.default_rng(seed)
        small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(path)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, jobs))
    return len(jobs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--work_dir", default="/tmp/dbsl-bench-eval")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--output", default="benchmark_eval.json")
    args = p.parse_args(argv)
    import open_clip
    import timm
    from safetensors.torch import save_file

    from dreambooth_singlora.eval import load_encoders, score_folder

    work = Path(args.work_dir)
    n = make_images(work / "images")
    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(work / "clip.safetensors"))
    dino = timm.create_model("vit_small_patch16_224", num_classes=0)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(work / "dino.safetensors"))
    t0 = time.perf_counter()
    encoders = load_encoders(["clip", "dino"], checkpoints={"clip": str(work / "clip.safetensors"),
                                                           "dino": str(work / "dino.safetensors")},
                             batch_size=args.batch_size)
    t1 = time.perf_counter()
    result = score_folder(work / "images", args.dataset_dir, encoders, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "generated_images": n, "scored_images": result["summary"]["all"]["dino"]["n_images"],
           "load_encoders_seconds": round(t1 - t0, 1), "score_seconds": round(t2 - t1, 1),
           "batch_size": args.batch_size,
           "command": "python benchmarks/benchmark_eval.py " + " ".join(argv or [])}
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
