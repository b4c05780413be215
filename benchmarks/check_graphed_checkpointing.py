"""GPU check: can a gradient-checkpointed UNet be captured as CUDA graphs, with the eager gradients?

    python benchmarks/check_graphed_checkpointing.py --output X.json

The trainer runs a `--gradient_checkpointing` UNet eagerly (no CUDA graphs), and an eager SDXL step at batch 1
is slow (docs/BENCHMARKS.md). This checks the first condition for graphing it: on the tiny random-weight SD1.5
and SDXL UNets (dreambooth_singlora.testing), fp32 on the GPU, with the SingLoRA adapter past its ramp and
checkpointing as the trainer sets it (`enable_checkpointing`), the adapter's gradients of one loss computed
eagerly (`Denoise`) and through `graph_unet` (three replays, new inputs copied in each time) should agree to
float32 rounding: the same kernels in the same order, and a recomputed block gives what its first forward gave.
Reports, per model, whether the capture worked (else its error's last line) and the largest gradient difference
relative to the largest gradient. The speed is benchmarks/profile_step.py's: `checkpointing` (graphed) against
`checkpointing+eager`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_step import adapted_unet, random_conditioning  # noqa: E402  (the step's own set-up)


def check(model_dir, dev="cuda") -> dict:
    from dreambooth_singlora.adapter import trainable_parameters
    from dreambooth_singlora.train_dreambooth import Denoise, enable_checkpointing, graph_unet

    dt = torch.float32
    unet = adapted_unet(model_dir, dt, dev)
    params = trainable_parameters(unet)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g, device=dev))
    enable_checkpointing(unet)
    size = unet.config.sample_size

    def inputs():
        cond = random_conditioning(unet.config, 1, dev, dt, generator=g)
        return torch.randn(1, 4, size, size, generator=g, device=dev), torch.randint(0, 1000, (1,), device=dev), cond

    def grads(denoise, x, t, cond):
        for p in params:
            p.grad = None
        denoise(x, t, *cond.values()).square().mean().backward()
        return [p.grad.clone() for p in params]

    x, t, cond = inputs()
    eager = Denoise(unet, dt, cond)
    if dev != "cuda":  # a check of the script: the comparison runs, against a second eager Denoise
        graphed = Denoise(unet, dt, cond)
    else:
        try:
            graphed = graph_unet(unet, (x, cond, None), dt)
        except Exception as e:  # noqa: BLE001 - the capture's refusal is the finding; the rest raises
            return {"captured": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
    worst = 0.0
    for _ in range(3):
        x, t, cond = inputs()
        ref = grads(eager, x, t, cond)
        got = grads(graphed, x, t, cond)
        scale = max(r.abs().max().item() for r in ref)
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(got, ref)) / scale)
    return {"captured": dev == "cuda", "max_rel_grad_diff": worst, "checkpointing": unet.is_gradient_checkpointing}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp/dbsl-check-gc")
    p.add_argument("--output", default="check_graphed_checkpointing.json")
    p.add_argument("--device", default="cuda", help="cpu: a check of the script itself (no capture there: the "
                   "eager step is compared with itself, so the difference must be 0)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("check_graphed_checkpointing.py checks CUDA graphs: run it on a machine with CUDA")
    from dreambooth_singlora.testing import build_tiny_pipeline, build_tiny_sdxl_pipeline

    from accelerate import PartialState

    PartialState()  # the trainer's pieces log through accelerate's logger, which needs its state (the trainer has it)
    out = {"torch": torch.__version__}
    for family, build in (("sd15", build_tiny_pipeline), ("sdxl", build_tiny_sdxl_pipeline)):
        out[family] = check(build(Path(args.work_dir) / family), args.device)
        print(family, json.dumps(out[family]), flush=True)
    Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
