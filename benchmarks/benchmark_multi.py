"""Multi-subject speed and memory at full SD1.5 size on one GPU (random weights: speed does not depend on them).

    python benchmarks/benchmark_multi.py --dataset_dir .devdata/dreambooth --subjects all --output X.json

1. builds the SD1.5 architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights in
   diffusers layout (reused from --work_dir if already there);
2. trains the --subjects (default: all 30) x --steps steps of --method (SingLoRA, LoRA or LoRA+) in one run
   (bf16, 512 px, dreambooth_singlora.train_dreambooth.train with --subjects, the function the CLI calls),
   timing it from the call to the last adapter written;
3. renders --render_images images (50 steps, guidance 7.5, 4 per prompt) from those adapters with
   dreambooth_singlora.generate.generate_many, subjects mixed in each batch, and extrapolates to the
   benchmark's 3,000 images (30 subjects x 25 prompts x 4) two ways: the whole time x 3,000 / N, and
   the first batch (which, with --compile, carries the compile) + the median later batch x the
   remaining batches of 3,000.
Targets: 30 x 400 steps in at most 60 s; 3,000 images in at most 600 s.
Prints a summary and writes every figure to --output (JSON). The defaults finish in about 5 minutes
on an H100.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_TARGET_S, RENDER_TARGET_S, BENCH_IMAGES = 60, 600, 3000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="folder of photo folders (<dataset_dir>/<subject>/*.jpg)")
    p.add_argument("--subjects", nargs="+", default=["all"], help="DreamBooth subjects in --dataset_dir, or all")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--method", default="singlora", choices=("singlora", "lora", "loraplus"))
    p.add_argument("--compile", action="store_true", help="render with --compile (torch.compile UNet and VAE decoder)")
    p.add_argument("--subjects_per_batch", type=int, default=None, help="default: all subjects in one batch")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--autocast", action="store_true", help="train with --autocast (the UNet under torch.autocast)")
    p.add_argument("--render_images", type=int, default=240, help="images to render and time (0: skip)")
    p.add_argument("--render_batch", type=int, default=48, help="images per batch (UNet batch: twice that)")
    p.add_argument("--render_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--render_dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--work_dir", default="/tmp/dbsl-bench-multi")
    p.add_argument("--output", default="benchmark_multi.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_multi.py measures GPU speed: run it on a machine with a CUDA GPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dreambooth_singlora.config import TrainConfig
    from dreambooth_singlora.generate import GenerateConfig, generate_many, load_pipeline
    from dreambooth_singlora.prompts import get_subject
    from dreambooth_singlora.testing import build_sd15_pipeline
    from dreambooth_singlora.train_dreambooth import train

    work = Path(args.work_dir)
    model = work / "sd15-random"
    t0 = time.perf_counter()
    if not (model / "model_index.json").is_file():
        build_sd15_pipeline(model, device="cuda")
    build_s = time.perf_counter() - t0
    torch.cuda.empty_cache()

    # 2. training: one run of every subject
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(pretrained_model_name_or_path=str(model), subjects=args.subjects, dataset_dir=args.dataset_dir,
                      output_dir=str(run), max_train_steps=args.steps, mixed_precision="bf16", report_to="none",
                      gradient_checkpointing=args.gradient_checkpointing, autocast=args.autocast, method=args.method,
                      subjects_per_batch=args.subjects_per_batch)
    names = [(s, s) for s in cfg.subjects]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg)
    train_wall = time.perf_counter() - t0
    stats = json.loads((run / "train_stats.json").read_text())
    n = len(names)
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "build_seconds": round(build_s, 1),
        "train": {
            "subjects": n, "steps": args.steps, "resolution": 512, "precision": "bf16", "method": args.method,
            "subjects_per_batch": stats["subjects_per_batch"], "gradient_checkpointing": args.gradient_checkpointing,
            "autocast": args.autocast,
            "wall_seconds": round(train_wall, 1),
            "loop_seconds": stats["loop_seconds"],
            "it_per_s": [b["it_per_s"] for b in stats["batches"]],
            "samples_per_s": [b["samples_per_s"] for b in stats["batches"]],
            "peak_gpu_memory_gb": round(stats["peak_gpu_memory_gb"], 2),
            "target_seconds_for_30x400": TRAIN_TARGET_S,
            "what_wall_counts": "train() call: model load, latent caching, all batches, checkpoints, "
                                "every subject's adapter + card + loss curve written",
        },
    }
    print(json.dumps(result["train"]), flush=True)

    # 3. rendering: subjects mixed in each batch
    if args.render_images > 0:
        per_subject = max(1, math.ceil(args.render_images / n))
        n_prompts = max(1, math.ceil(per_subject / 4))
        prompts = {nm: get_subject(s).eval_prompts()[:n_prompts] for nm, s in names}
        cfg = GenerateConfig(adapter=str(run / names[0][0]), num_images_per_prompt=4, seed=0,
                             num_inference_steps=args.render_steps, guidance_scale=args.guidance_scale,
                             batch_size=args.render_batch, merge=False, dtype=args.render_dtype, compile=args.compile)
        pipe = load_pipeline(None, str(model), device="cuda", dtype=args.render_dtype, scheduler="ddim")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        images_dir = work / "images"
        shutil.rmtree(images_dir, ignore_errors=True)
        t0 = time.perf_counter()
        out = generate_many(pipe, {nm: run / nm for nm, _ in names}, cfg, images_dir, prompts)
        torch.cuda.synchronize()
        render_s = time.perf_counter() - t0
        per_image = render_s / out["images"]
        # the first batch carries the compile (with --compile); the others show the steady rate
        later = statistics.median(out["batch_seconds"][1:]) if len(out["batch_seconds"]) > 1 else None
        extra = round(out["batch_seconds"][0] + (math.ceil(BENCH_IMAGES / args.render_batch) - 1) * later, 1) \
            if later else None
        result["render"] = {
            "images": out["images"], "subjects": n, "steps": args.render_steps, "guidance_scale": args.guidance_scale,
            "scheduler": "ddim", "dtype": args.render_dtype, "batch_images": args.render_batch,
            "compile": args.compile, "batch_seconds": out["batch_seconds"],
            "first_batch_seconds": out["batch_seconds"][0],
            "median_later_batch_seconds": later,
            "extrapolated_seconds_for_3000_first_batch_plus_later": extra,
            "unet_batch": args.render_batch * (2 if args.guidance_scale > 1 else 1),
            "seconds": round(render_s, 1), "images_per_s": round(out["images"] / render_s, 3),
            "extrapolated_seconds_for_3000": round(per_image * BENCH_IMAGES, 1),
            "target_seconds_for_3000": RENDER_TARGET_S,
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "what_seconds_counts": "generate_many(): adapters loaded into the bank, all batches (text encoding, "
                                   "50 UNet steps with CFG, VAE decode), PNGs, index.json and contact sheets",
        }
        print(json.dumps(result["render"]), flush=True)

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    tr = result["train"]
    print(f"\n{result['gpu']}: {n} subjects x {args.steps} steps {args.method}, bf16, 512 px, "
          f"{tr['subjects_per_batch']} subjects per batch")
    print(f"  training: {tr['wall_seconds']} s wall ({tr['loop_seconds']} s in the loop; target {TRAIN_TARGET_S} s "
          f"for 30 x 400), {tr['samples_per_s']} samples/s, peak {tr['peak_gpu_memory_gb']} GB")
    if "render" in result:
        r = result["render"]
        print(f"  rendering: {r['images']} images in {r['seconds']} s ({r['images_per_s']} images/s, peak "
              f"{r['peak_gpu_memory_gb']} GB) -> {r['extrapolated_seconds_for_3000']} s for 3,000 "
              f"(first batch + later batches: {r['extrapolated_seconds_for_3000_first_batch_plus_later']} s; "
              f"target {RENDER_TARGET_S} s)")


if __name__ == "__main__":
    main()
