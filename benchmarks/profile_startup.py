"""Where a one-subject run's time goes before its first step, on the GPU (random-weight SD1.5).

    python benchmarks/profile_startup.py --model /tmp/dbsl-bench/sd15-random --output startup.json

Times, in one fresh process: each import, CUDA start, each model's from_pretrained (into the compute
dtype, on the CPU, then moved; and with device_map straight to the GPU), and the capture of the UNet's
forward/backward as CUDA graphs with 1, 2 and 3 warm-up iterations. Prints and writes JSON.

`--profile_first` runs the first capture under torch.profiler and keeps the operators that took the
most CPU time (what the first capture in a process waits on); `--eager_first` times one eager
forward/backward before it. Run it under environment variants (CUDA_MODULE_LOADING=EAGER,
TORCH_CUDNN_V8_API_DISABLED=1, ...) to see which one-time cost the first capture pays.
"""

from __future__ import annotations

import argparse
import json
import os
import time

T0 = time.perf_counter()
marks: dict = {}


def mark(name: str, since: float) -> float:
    now = time.perf_counter()
    marks[name] = round(now - since, 3)
    print(f"{name}: {marks[name]} s", flush=True)
    return now


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--output", default="startup.json")
    p.add_argument("--profile_first", action="store_true", help="torch.profiler over the first capture")
    p.add_argument("--eager_first", action="store_true", help="one eager forward/backward before the first capture")
    args = p.parse_args(argv)
    t = T0
    import torch
    t = mark("import torch", t)
    import diffusers  # noqa: F401
    t = mark("import diffusers", t)
    import transformers  # noqa: F401
    t = mark("import transformers", t)
    import accelerate  # noqa: F401
    t = mark("import accelerate", t)
    import dreambooth_singlora.train_dreambooth as T
    t = mark("import dreambooth_singlora.train_dreambooth", t)
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    t = mark("CUDA start", t)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    dt = torch.bfloat16
    for name, cls, sub in (("text_encoder", CLIPTextModel, "text_encoder"), ("vae", AutoencoderKL, "vae"),
                           ("unet", UNet2DConditionModel, "unet")):
        m = cls.from_pretrained(args.model, subfolder=sub, torch_dtype=dt)
        t = mark(f"{name} from_pretrained (CPU)", t)
        m.to("cuda")
        torch.cuda.synchronize()
        t = mark(f"{name} .to(cuda)", t)
        del m
    for name, cls, sub in (("vae", AutoencoderKL, "vae"), ("unet", UNet2DConditionModel, "unet")):
        try:
            m = cls.from_pretrained(args.model, subfolder=sub, torch_dtype=dt, device_map="cuda")
            torch.cuda.synchronize()
            t = mark(f"{name} from_pretrained device_map=cuda", t)
            del m
        except Exception as e:  # noqa: BLE001
            marks[f"{name} device_map=cuda"] = f"failed: {type(e).__name__}: {e}"[:200]
            t = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dt).to("cuda")
    from dreambooth_singlora import SingLoRAConfig, add_adapter, set_step
    add_adapter(unet, SingLoRAConfig())
    set_step(unet, 100)
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=dt)
    ts, emb = torch.zeros(1, dtype=torch.long, device="cuda"), torch.randn(1, 77, 768, device="cuda", dtype=dt)
    t = time.perf_counter()
    if args.eager_first:
        T.Denoise(unet, dt)(x, ts, emb).float().square().mean().backward()
        torch.cuda.synchronize()
        t = mark("first eager forward/backward", t)
    top = None
    for i, warm in enumerate((3, 1, 2, 3)):
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
            if args.profile_first and top is None else None
        if prof is not None:
            prof.__enter__()
        f = torch.cuda.make_graphed_callables(T.Denoise(unet, dt), (x, ts, emb), num_warmup_iters=warm)
        torch.cuda.synchronize()
        t = mark(f"graph capture, {warm} warm-up iterations" + (" (the first in the process)" if i == 0 else ""), t)
        if prof is not None:
            prof.__exit__(None, None, None)
            top = [{"op": e.key, "calls": e.count, "cpu_total_s": round(e.cpu_time_total / 1e6, 3),
                    "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3)}
                   for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]
            print(json.dumps(top, indent=1), flush=True)
            t = time.perf_counter()  # the profiler's own teardown is not the capture's
        for _ in range(20):
            f(x, ts, emb).float().square().mean().backward()
        torch.cuda.synchronize()
        t = mark(f"20 graphed steps after capture {i + 1}", t)
        del f
    marks["total"] = round(time.perf_counter() - T0, 3)
    with open(args.output, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": marks,
                   "first_capture_top_ops": top, "env": {k: v for k, v in os.environ.items()
                                                          if k.startswith(("CUDA_", "TORCH_", "CUDNN"))}}, fh, indent=2)


if __name__ == "__main__":
    main()
