"""Training speed and memory at full SD1.5 size, on the GPU (random weights: speed does not depend on them).

    python benchmarks/benchmark.py --dataset_dir DIR --subject dog --output benchmark.json

1. builds the SD1.5 architecture (UNet 859.5M, VAE, CLIP ViT-L text encoder) with random weights
   and saves it in diffusers layout (fp16), as a user's local model folder would be;
2. times the UNet alone (forward + backward to the adapter, batch 1, 512 px, bf16), eager and
   CUDA-graphed, for the share of a training step that the UNet takes;
3. runs the real trainer (`python -m dreambooth_singlora.train_dreambooth`, the command users run)
   for each method, 400 steps, timing the whole process (start -> adapter saved) and reading the
   loop's it/s and peak memory from the run's train_stats.json;
4. compares what the runs learned: CUDA graphs against eager, `--variant` (extra trainer flags, e.g.
   --no-channels_last) against the default, and with `--repeats 2` a run against its own repeat
   (the run-to-run noise the other differences are read against).
`--warmup` first runs the trainer for a few steps so that Python's bytecode caches exist (a pip
install writes them; a machine with PYTHONDONTWRITEBYTECODE set pays source compilation in every
process instead). Prints a Markdown table and writes every figure, with the commands, to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def unet_alone(model_dir: Path, method: str | None, graphed: bool, iters: int = 50) -> float:
    """Samples/s of the frozen UNet forward + backward (to the adapter, or to the input without one)."""
    from diffusers import UNet2DConditionModel

    from dreambooth_singlora import SingLoRAConfig, add_adapter, set_step
    from dreambooth_singlora.train_dreambooth import Denoise

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to("cuda", torch.bfloat16)
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=method is None)
    t, emb = torch.tensor([500], device="cuda"), torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)
    if method:
        add_adapter(unet, SingLoRAConfig(method=method))
        set_step(unet, 1000)
    f = Denoise(unet, torch.bfloat16)
    if graphed:
        f = torch.cuda.make_graphed_callables(f, (x, t, emb))
    for i in range(iters + 10):
        if i == 10:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        f(x, t, emb).float().square().mean().backward()
    torch.cuda.synchronize()
    rate = iters / (time.perf_counter() - t0)
    del unet, f
    torch.cuda.empty_cache()
    return rate


def run_trainer(model_dir: Path, args, method: str, graphs: bool, out: Path, extra=(), steps=None) -> dict:
    cmd = [sys.executable, "-m", "dreambooth_singlora.train_dreambooth", "--pretrained_model_name_or_path",
           str(model_dir), "--subject", args.subject, "--dataset_dir", args.dataset_dir, "--output_dir", str(out),
           "--method", method, "--max_train_steps", str(steps or args.steps), "--mixed_precision", "bf16",
           "--report_to", "none", "--cuda_graphs" if graphs else "--no-cuda_graphs", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"trainer failed for {method}")
    stats = json.loads((out / "train_stats.json").read_text())
    return {"method": method, "cuda_graphs": graphs, "flags": list(extra), "wall_seconds": round(wall, 1),
            "phases": stats.get("phases_seconds_from_process_start"),
            "it_per_s": round(stats["it_per_s"], 2), "peak_gpu_memory_gb": round(stats["peak_gpu_memory_gb"], 2),
            "trainable_parameters": stats["trainable_parameters"],
            "command": " ".join(c if " " not in c else repr(c) for c in cmd)}


def compare(first: Path, second: Path) -> dict:
    """Two runs of one seed: their logged loss curves and final adapters (what was learned)."""
    from safetensors.torch import load_file

    hist = [json.loads((d / "train_stats.json").read_text())["loss_history"] for d in (first, second)]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (first, second))
    return {"runs": [first.name, second.name], "loss_points": len(hist[0]),
            "max_abs_loss_difference": max(abs(x[1] - y[1]) for x, y in zip(*hist)),
            "final_loss": [hist[0][-1][1], hist[1][-1][1]],
            "max_relative_adapter_difference": max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="DreamBooth dataset folder (<dir>/<subject>/*.jpg)")
    p.add_argument("--subject", default="dog")
    p.add_argument("--methods", nargs="+", default=["singlora", "lora", "dora"])
    p.add_argument("--eager_methods", nargs="*", default=["singlora", "lora"], help="also run these without CUDA graphs")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--skip_unet_alone", action="store_true", help="skip timing the UNet alone")
    p.add_argument("--work_dir", default="/tmp/dbsl-bench")
    p.add_argument("--output", default="benchmark.json")
    p.add_argument("--repeats", type=int, default=1, help="run each CUDA-graphed configuration this many times")
    p.add_argument("--variant", nargs="+", default=None, metavar="FLAG",
                   help="also run the CUDA-graphed methods with these trainer flags (--variant=--no-channels_last)")
    p.add_argument("--warmup", action="store_true", help="a 5-step run first, so that bytecode caches exist")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py measures GPU speed: run it on a machine with a CUDA GPU")
    from dreambooth_singlora.testing import build_sd15_pipeline

    work = Path(args.work_dir)
    model = work / "sd15-random"
    t0 = time.perf_counter()
    if not (model / "model_index.json").is_file():
        build_sd15_pipeline(model, device="cuda")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
              "resolution": 512, "batch_size": 1, "precision": "bf16", "build_seconds": round(time.perf_counter() - t0, 1),
              "unet_alone_samples_per_s": {}, "runs": []}
    for method in () if args.skip_unet_alone else (None, "singlora", "lora"):
        for graphed in (False, True):
            key = f"{method or 'frozen, grad to input'}{' graphed' if graphed else ' eager'}"
            result["unet_alone_samples_per_s"][key] = round(unet_alone(model, method, graphed), 2)
            print(key, result["unet_alone_samples_per_s"][key], flush=True)
    if args.warmup:
        result["warmup"] = run_trainer(model, args, args.methods[0], True, work / "warmup", steps=5)
        print("warm-up", json.dumps(result["warmup"]), flush=True)
    runs = [(m, True, (), f"run-{m}-graphs{f'-{i + 1}' if i else ''}") for i in range(args.repeats)
            for m in args.methods] + [(m, False, (), f"run-{m}-eager") for m in args.eager_methods] + \
        [(m, True, tuple(args.variant), f"run-{m}-graphs-variant") for m in (args.methods if args.variant else ())]
    for method, graphs, extra, name in runs:
        shutil.rmtree(work / name, ignore_errors=True)
        r = run_trainer(model, args, method, graphs, work / name, extra)
        alone = result["unet_alone_samples_per_s"].get(f"{method} {'graphed' if graphs else 'eager'}")
        r["unet_share_of_step"] = round(r["it_per_s"] / alone, 2) if alone else None
        result["runs"].append(r)
        print(json.dumps(r), flush=True)
    pairs = {"graphs_vs_eager": "eager", "repeat": "graphs-2", "default_vs_variant": "graphs-variant"}
    for key, other in pairs.items():
        result[key] = {m: compare(work / f"run-{m}-graphs", work / f"run-{m}-{other}") for m in args.methods
                       if (work / f"run-{m}-{other}" / "train_stats.json").is_file()}
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"\nGPU: {result['gpu']}, {args.steps} steps, batch 1, 512 px, bf16\n")
    print("| method | CUDA graphs | flags | loop it/s | whole run (s) | peak GPU memory (GB) | UNet share of step |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['method']} | {'on' if r['cuda_graphs'] else 'off'} | {' '.join(r['flags']) or '-'} | "
              f"{r['it_per_s']} | {r['wall_seconds']} | {r['peak_gpu_memory_gb']} | {r['unet_share_of_step']} |")
    for key in pairs:
        for m, c in result[key].items():
            print(f"{key} {m}: {json.dumps(c)}")


if __name__ == "__main__":
    main()
