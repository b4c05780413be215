"""Where rendering time goes: UNet forward, VAE decode and PNG writing, each alone, on one GPU.

    python benchmarks/benchmark_render_parts.py --output X.json [--compile]

Full SD1.5 architecture, random weights (speed does not depend on them), 512 px, fp16:
1. UNet forward at --unet_batch samples (guidance doubles the images of a batch), samples/s, for
   each scaled-dot-product-attention backend torch offers here (default choice, flash,
   memory-efficient, cuDNN), eager; with --compile also torch.compile'd (default choice and cuDNN);
2. VAE decode of --vae_batch latents, images/s, per attention backend;
3. PNG encoding of a 512 x 512 RGB image with PIL at compress levels 6 (PIL's default) and 1, one
   thread and --png_threads threads.
Every figure goes to --output (JSON) and is printed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, iters: int, warmup: int = 2) -> float:
    """Seconds per call of fn(), after warmup calls, the GPU synchronised around the timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def backends():
    from torch.nn.attention import SDPBackend

    return {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def with_backend(fn, backend):
    from torch.nn.attention import sdpa_kernel

    if backend is None:
        return fn

    def run():
        with sdpa_kernel([backend]):
            return fn()
    return run


def compiled_variant(unet, x, t, emb, variant: str, iters: int, report) -> None:
    """Time torch.compile(unet) with the options named in `variant` ('+'-joined), then undo them."""
    import copy

    import torch._inductor.config as ic

    opts = set(variant.split("+"))
    net = copy.deepcopy(unet)
    if "bank" in opts:
        from dreambooth_singlora.adapter import add_adapter
        from dreambooth_singlora.config import SingLoRAConfig
        from dreambooth_singlora.bank import add_bank

        add_adapter(net, SingLoRAConfig())
        routing = add_bank(net, 30)
        routing.set_coef(0.5)
        routing.route(torch.arange(x.shape[0], device=x.device) % 30)
    if "cl" in opts:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    saved = (ic.conv_1x1_as_mm, ic.coordinate_descent_tuning)
    if "tuned" in opts:
        ic.conv_1x1_as_mm, ic.coordinate_descent_tuning = True, True
    torch._dynamo.reset()
    try:
        cu = torch.compile(net, mode="max-autotune-no-cudagraphs" if "autotune" in opts else None)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cu(x, t, emb)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            report("unet", f"compiled/{variant}", timed(lambda: cu(x, t, emb).sample, iters), x.shape[0])
            print(f"      (compile {compile_s:.0f} s)", flush=True)
    finally:
        ic.conv_1x1_as_mm, ic.coordinate_descent_tuning = saved
        del net
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet_batch", type=int, default=96)
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNet and VAE (minutes)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="compiled UNet variants to time (each compiles afresh): cl = channels_last, tuned = "
                        "inductor's conv_1x1_as_mm + coordinate_descent_tuning, "
                        "autotune = mode max-autotune-no-cudagraphs, "
                        "bank = with a routed SingLoRA bank of 30 subjects; join with '+', e.g. cl+tuned+bank")
    p.add_argument("--skip_eager", action="store_true", help="skip the eager UNet/VAE/PNG timings")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (cuDNN times its convolution algorithms per shape)")
    p.add_argument("--png_threads", type=int, default=8)
    p.add_argument("--output", default="benchmark_render_parts.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_render_parts.py measures GPU speed: run it on a machine with a CUDA GPU")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreambooth_singlora.testing import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(dev, dt).eval()
    vae = AutoencoderKL(**SD15_VAE_CONFIG).to(dev, dt).eval()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "fp16",
           "cudnn_benchmark": args.cudnn_benchmark,
           "unet_batch": args.unet_batch, "vae_batch": args.vae_batch, "unet": {}, "vae": {}, "png": {}}
    B = args.unet_batch
    x = torch.randn(B, 4, 64, 64, device=dev, dtype=dt)
    emb = torch.randn(B, 77, 768, device=dev, dtype=dt)
    t = torch.full((B,), 500, device=dev)
    z = torch.randn(args.vae_batch, 4, 64, 64, device=dev, dtype=dt)

    def report(part, name, sec, n):
        out[part][name] = {"seconds_per_call": round(sec, 5), "per_s": round(n / sec, 1)}
        unit = "samples" if part == "unet" else "images"
        print(f"{part:5s} {name:22s} {sec * 1e3:8.1f} ms/call  {n / sec:8.1f} {unit}/s", flush=True)

    for variant in args.variants:
        compiled_variant(unet, x, t, emb, variant, args.iters, report)
    if args.skip_eager:
        Path(args.output).write_text(json.dumps(out, indent=2))
        return
    with torch.inference_mode():
        for name, b in backends().items():
            try:
                report("unet", f"eager/{name}", timed(with_backend(lambda: unet(x, t, emb).sample, b), args.iters), B)
            except RuntimeError as e:
                out["unet"][f"eager/{name}"] = {"error": str(e).splitlines()[0][:200]}
                print(f"unet  eager/{name}: {out['unet'][f'eager/{name}']['error']}", flush=True)
            try:
                report("vae", f"eager/{name}", timed(with_backend(lambda: vae.decode(z).sample, b), args.iters),
                       args.vae_batch)
            except RuntimeError as e:
                out["vae"][f"eager/{name}"] = {"error": str(e).splitlines()[0][:200]}
                print(f"vae   eager/{name}: {out['vae'][f'eager/{name}']['error']}", flush=True)
        if args.compile:
            for name in ("default", "cudnn"):
                b = backends()[name]
                torch._dynamo.reset()
                cu = torch.compile(unet)
                t0 = time.perf_counter()
                with_backend(lambda: cu(x, t, emb).sample, b)()
                torch.cuda.synchronize()
                out["unet"][f"compiled/{name}/compile_seconds"] = round(time.perf_counter() - t0, 1)
                report("unet", f"compiled/{name}", timed(with_backend(lambda: cu(x, t, emb).sample, b), args.iters), B)
            torch._dynamo.reset()
            cdec = torch.compile(vae.decode)
            t0 = time.perf_counter()
            cdec(z)
            torch.cuda.synchronize()
            out["vae"]["compiled/default/compile_seconds"] = round(time.perf_counter() - t0, 1)
            report("vae", "compiled/default", timed(lambda: cdec(z).sample, args.iters), args.vae_batch)

    from PIL import Image

    rng = np.random.default_rng(0)
    # a smooth image compresses like a photo (random noise would not)
    yy, xx = np.mgrid[0:512, 0:512]
    arr = np.stack([(xx * 0.5 + yy * 0.2) % 256, (yy * 0.7) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    for level in (6, 1):
        def enc():
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=level)
            return buf.tell()
        n = 40
        t0 = time.perf_counter()
        size = [enc() for _ in range(n)][-1]
        one = (time.perf_counter() - t0) / n
        with ThreadPoolExecutor(args.png_threads) as ex:
            t0 = time.perf_counter()
            list(ex.map(lambda _: enc(), range(4 * n)))
            many = (time.perf_counter() - t0) / (4 * n)
        out["png"][f"level{level}"] = {"bytes": size, "ms_one_thread": round(one * 1e3, 2),
                                       f"ms_per_image_{args.png_threads}_threads": round(many * 1e3, 2)}
        print(f"png   level {level}: {size} bytes, {one * 1e3:.1f} ms one thread, {many * 1e3:.1f} ms/image with "
              f"{args.png_threads} threads", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
