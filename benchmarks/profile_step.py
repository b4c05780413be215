"""Where a training step spends its GPU time, for one subject (CUDA graphs) or a bank of many (eager or compiled).

    python benchmarks/profile_step.py --model /tmp/dbsl-bench/sd15-random --subjects 1 --variants default channels_last
    python benchmarks/profile_step.py --model /tmp/dbsl-bench/sd15-random --subjects 30 --variants default compile

The trainer's own pieces on random-weight SD1.5 at 512 px, bf16, rank 8 on to_q/to_k: one subject is
the plain SingLoRA adapter captured as CUDA graphs (`graph_unet`, as the trainer's group of one on one
GPU); several are an adapter bank (`add_bank`, one row per sample) run eagerly through `Denoise`, as
the trainer's batched group. Each variant times a forward + backward + fused AdamW step. A variant is
"default" or one or more of these joined by "+" (channels_last+autocast):

    channels_last   the UNet's weights (and so its activations) in channels-last memory format (the
                    trainer's default for one subject; "default" here is contiguous)
    autocast        the forward under torch.autocast (norms in fp32), as `--autocast`; else the bf16
                    UNet runs as loaded, the trainer's default
    one_adapter     with --subjects > 1: every sample through one plain SingLoRA adapter, no bank (the
                    same gradients' path through the UNet without the routing): the floor a bank stands on
    sdpa_<backend>  attention forced to one SDPA backend (flash, efficient, cudnn, math)
    checkpointing   --gradient_checkpointing (enable_checkpointing); one subject stays CUDA-graphed here, which
                    the trainer does not do yet (it runs a checkpointed UNet eagerly): what graphing it would give
    eager           with --subjects 1: no CUDA graphs (as --no-cuda_graphs)
    compile         torch.compile of Denoise (the first step carries the compile; run the script twice
                    with one TORCHINDUCTOR_CACHE_DIR to see what a warm cache saves)

and, for the first variant, the CUDA kernels that take the most time in one step (torch.profiler).
Only the first variant's first step pays the process's one-time costs (cuDNN's kernel builds).
`--device cpu` with a tiny model checks the script. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def adapted_unet(model: str, dtype, device):
    """The frozen UNet of the diffusers folder `model` with the plain SingLoRA adapter, past the ramp (u = 1)."""
    from diffusers import UNet2DConditionModel

    from dreambooth_singlora import SingLoRAConfig, add_adapter, set_step

    net = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(device)
    net.requires_grad_(False)
    add_adapter(net, SingLoRAConfig())
    set_step(net, 1000)
    return net


def random_conditioning(config, n: int, device, dtype, generator=None) -> dict:
    """Random conditioning of `n` samples as the trainer passes it (base.Base.encode_prompt): the text states and,
    for SDXL, the pooled text embedding and the time ids of an uncropped image at the UNet's own size."""
    cond = {"encoder_hidden_states": torch.randn(n, 77, config.cross_attention_dim, generator=generator,
                                                 device=device).to(dtype)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        px = config.sample_size * 8
        cond["text_embeds"] = torch.randn(n, pooled, generator=generator, device=device).to(dtype)
        cond["time_ids"] = torch.tensor([[px, px, 0, 0, px, px]] * n, device=device, dtype=dtype)
    return cond


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t)
    return out


def top_kernels(step, dev: str, k: int = 15) -> dict:
    cuda = dev == "cuda"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA if cuda else
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        sync()

    def own(e):  # microseconds
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=lambda e: -own(e))
    total = sum(own(e) for e in events)
    return {"gpu_ms_per_step": round(total / 1e3, 2),
            "top": [{"kernel": e.key[:120], "calls": e.count, "ms": round(own(e) / 1e3, 2),
                     "share": round(own(e) / total, 3)} for e in events[:k]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a diffusers SD1.5 folder (testing.build_sd15_pipeline)")
    p.add_argument("--subjects", type=int, default=30, help="1: the plain adapter, CUDA-graphed; more: a bank")
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--output", default="step_profile.json")
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script on a tiny model")
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dreambooth_singlora.adapter import trainable_parameters
    from dreambooth_singlora.bank import add_bank, bank_parameters
    from dreambooth_singlora.train_dreambooth import Denoise, enable_checkpointing, graph_unet

    from accelerate import PartialState

    PartialState()  # the trainer's pieces log through accelerate's logger, which needs its state (the trainer has it)
    dt, n, dev = torch.bfloat16, args.subjects, args.device

    unet = adapted_unet(args.model, dt, dev)
    if n > 1:
        routing = add_bank(unet, n)
        routing.route(torch.arange(n, device=dev))
        routing.set_coef(1.0)
        params = bank_parameters(unet)
    else:
        params = trainable_parameters(unet)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    size = unet.config.sample_size  # 64 latents: 512 px
    x = torch.randn(n, 4, size, size, device=dev, dtype=dt)
    ts = torch.randint(0, 1000, (n,), device=dev)
    cond = random_conditioning(unet.config, n, dev, dt)
    out: dict = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else dev, "torch": torch.__version__,
                 "subjects": n, "path": "bank, eager" if n > 1 else "one adapter", "variants": {}}
    one, one_opt = None, None
    for variant in args.variants:
        parts = set(variant.split("+")) - {"default"}
        unknown = {x for x in parts if x not in ("channels_last", "autocast", "compile", "one_adapter", "checkpointing",
                                                 "eager")
                   and not x.startswith("sdpa_")}
        if unknown:
            p.error(f"unknown variant part(s) {sorted(unknown)} in {variant!r}")
        backend = next((x.removeprefix("sdpa_") for x in parts if x.startswith("sdpa_")), None)
        autocast = "autocast" in parts
        attention = sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]) \
            if backend else contextlib.nullcontext()
        if "one_adapter" in parts and one is None:
            one = adapted_unet(args.model, dt, dev)
            one_opt = torch.optim.AdamW(trainable_parameters(one), lr=1e-4, fused=dev == "cuda")
        model, optimizer = (one, one_opt) if "one_adapter" in parts else (unet, opt)
        model.to(memory_format=torch.channels_last if "channels_last" in parts else torch.contiguous_format)
        if "checkpointing" in parts:  # --gradient_checkpointing, as the trainer sets it (graphed too)
            enable_checkpointing(model)
        else:
            model.disable_gradient_checkpointing()
        graphs = n == 1 and dev == "cuda" and "eager" not in parts
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with attention:
            if "compile" in parts:
                denoise = torch.compile(Denoise(model, dt, cond, autocast))
            elif graphs:
                denoise = graph_unet(model, (x, cond, None), dt, autocast)
            else:
                denoise = Denoise(model, dt, cond, autocast)

            def step():
                denoise(x, ts, *cond.values()).float().square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            first = timed(step, 1)[0] + (time.perf_counter() - t0 if graphs else 0.0)
            timed(step, 3)
            s = timed(step, args.steps)
            med = statistics.median(s)
            key = variant if variant not in out["variants"] else f"{variant} ({len(out['variants']) + 1})"  # a repeat
            out["variants"][key] = {"first_step_s": round(first, 3), "median_s": round(med, 5),
                                        "min_s": round(min(s), 5), "max_s": round(max(s), 5),
                                        "steps_per_s": round(1 / med, 2), "samples_per_s": round(n / med, 1),
                                        "cuda_graphs": graphs, "peak_gpu_memory_gb": round(
                                            torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None}
            if len(out["variants"]) == 1:
                out["kernels"] = top_kernels(step, dev)
        print(variant, json.dumps(out["variants"][key]), flush=True)
        del denoise
        with open(args.output, "w") as fh:  # after every variant: what a later crash or time limit cuts is kept
            json.dump(out, fh, indent=2)
    print(json.dumps(out["kernels"], indent=1), flush=True)


if __name__ == "__main__":
    main()
