"""GPU check of `--gradient_checkpointing` under CUDA graphs (the CPU tests cannot capture a graph).

    python benchmarks/check_graphed_checkpointing.py --dataset_dir .devdata/dreambooth --output X.json

On the tiny random-weight SD1.5 and SDXL pipelines (dreambooth_singlora.testing), fp32 on the GPU, the trainer
runs one subject for a few steps three ways: checkpointed and eager (`--no-cuda_graphs`), checkpointed and
graphed (the default on one GPU), and graphed without checkpointing. The three adapters should agree to
float32 rounding: the same kernels in the same order, only captured, and a recomputed block gives what its
first forward gave. Reports each run's largest difference to the eager checkpointed one, relative to the
largest adapter entry, and whether the run says it used CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

RUNS = {"checkpointed_eager": ["--gradient_checkpointing", "--no-cuda_graphs"],
        "checkpointed_graphed": ["--gradient_checkpointing"], "graphed": []}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="DreamBooth photos: <dataset_dir>/dog/")
    p.add_argument("--work_dir", default="/tmp/dbsl-check-gc")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--output", default="check_graphed_checkpointing.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_graphed_checkpointing.py checks CUDA graphs: run it on a machine with CUDA")
    from dreambooth_singlora.testing import build_tiny_pipeline, build_tiny_sdxl_pipeline

    work, out = Path(args.work_dir), {}
    for family, build in (("sd15", build_tiny_pipeline), ("sdxl", build_tiny_sdxl_pipeline)):
        model = build(work / family)
        adapters = {}
        for name, flags in RUNS.items():
            run_dir = work / f"{family}-{name}"
            cmd = [sys.executable, "-m", "dreambooth_singlora.train_dreambooth", "--pretrained_model_name_or_path",
                   str(model), "--subject", "dog", "--dataset_dir", args.dataset_dir, "--resolution", "64",
                   "--max_train_steps", str(args.steps), "--ramp_steps", "0", "--mixed_precision", "no",
                   "--report_to", "none", "--overwrite", "--output_dir", str(run_dir), *flags]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                out[f"{family}/{name}"] = {"error": r.stderr.strip().splitlines()[-1:]}
                print(family, name, "failed:", r.stderr[-2000:], flush=True)
                continue
            adapters[name] = load_file(run_dir / "adapter_model.safetensors")
            stats = json.loads((run_dir / "train_stats.json").read_text())
            out[f"{family}/{name}"] = {"cuda_graphs": stats["cuda_graphs"], "it_per_s": stats["it_per_s"]}
        ref = adapters.get("checkpointed_eager")
        for name, a in adapters.items():
            if ref is not None:
                scale = max(t.abs().max().item() for t in ref.values())
                out[f"{family}/{name}"]["max_rel_diff_to_checkpointed_eager"] = max(
                    (a[k] - ref[k]).abs().max().item() for k in ref) / scale
            print(family, name, json.dumps(out[f"{family}/{name}"]), flush=True)
    Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
