"""Several subjects in one batch on the tiny pipeline (CPU): a bank of adapters routed per sample.

Tolerances. The equivalence checks run in float64 (torch's default dtype during the fixture; the
trainer runs "no" mixed precision in it). A bank and a single adapter compute the same sums in another
order (batch 2 vs 1 in the frozen UNet, bmm vs matmul): per operation that is a relative rounding
difference of a few float64 ulps (~1e-15), which Adam's normalised steps carry through a few steps
(seen: 1e-15 to 7e-14), so 1e-10 of the largest weight holds with four orders of margin on any CPU,
where float32 (ulp 1e-7) would not. One step's per-subject gradients: the same bound. Routed images:
1/255 per pixel (the float32 pipeline, one rounding of the PNG). A resumed run equals the
uninterrupted one exactly: the same code computes the same sums.
"""

import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dreambooth_singlora.train_dreambooth as T
from dreambooth_singlora import UserError, load_adapter
from dreambooth_singlora.adapter import (adapter_state_dict, add_adapter, attention_modules, remove_adapter,
                                         save_adapter, set_step, trainable_parameters)
from dreambooth_singlora.bank import (BankProcessor, add_bank, bank_parameters, bank_state_dict,
                                      clip_grad_norm_per_row_, get_routing)
from dreambooth_singlora.checkpoint import list_checkpoints
from dreambooth_singlora.config import SingLoRAConfig, TrainConfig
from dreambooth_singlora.generate import generate_many
from dreambooth_singlora.train_dreambooth import train
from helpers import killed_run, noise_schedule

STEPS = 6
SUBJECTS = ("dog", "cat")
FP64_TOL = 1e-10  # see the module docstring


def base(tiny_pipeline, dataset_dir, **kw):
    # max_grad_norm small enough that clipping acts every step; accumulation 2: micro-batches too
    return {**dict(pretrained_model_name_or_path=str(tiny_pipeline), dataset_dir=dataset_dir, resolution=32,
                   max_train_steps=STEPS, checkpointing_steps=2, log_every=2, random_flip=True, report_to="none",
                   ramp_steps=3, mixed_precision="no", max_grad_norm=0.05,
                   gradient_accumulation_steps=2), **kw}


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a) / max(a[k].abs().max().item() for k in a)


class float64:
    """torch's default dtype is float64 inside the block (the trainer's "no" precision then runs in it)."""

    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


@pytest.fixture(scope="module", params=["singlora", "lora", "loraplus"])
def runs(request, tiny_pipeline, dataset_dir, tmp_path_factory):
    """In float64: two single-subject runs and one run of both subjects in one batch, same flags and seed."""
    method, root = request.param, tmp_path_factory.mktemp(f"runs-{request.param}")
    flags = base(tiny_pipeline, dataset_dir, method=method)
    with float64():
        for s in SUBJECTS:
            train(TrainConfig(**flags, subject=s, output_dir=str(root / "single" / s)))
        T.main(["--subjects", *SUBJECTS, "--output_dir", str(root / "multi"), "--pretrained_model_name_or_path",
                str(tiny_pipeline), "--dataset_dir", dataset_dir, "--resolution", "32", "--max_train_steps", str(STEPS),
                "--checkpointing_steps", "2", "--log_every", "2", "--random_flip", "--ramp_steps", "3",
                "--mixed_precision", "no", "--max_grad_norm", "0.05", "--gradient_accumulation_steps", "2",
                "--method", method, "--report_to", "none"])
    return method, root


# --------------------------------------------------------------------------- the bank, on the UNet

def test_clip_per_row_is_torch_clip_of_each_row_alone():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 5, 2)), torch.nn.Parameter(torch.zeros(3, 4, 2))]
    for p, s in zip(params, (1.0, 3.0)):
        p.grad = torch.randn(p.shape, generator=g) * s
    p.grad[1] *= 1e-3  # row 1 under the limit: left alone
    rows = [[torch.nn.Parameter(p[i].detach().clone()) for p in params] for i in range(3)]
    for i, r in enumerate(rows):
        for q, p in zip(r, params):
            q.grad = p.grad[i].clone()
        torch.nn.utils.clip_grad_norm_(r, 2.0)
    norms = clip_grad_norm_per_row_(params, 2.0)
    assert norms.shape == (3,)
    for i, r in enumerate(rows):
        for q, p in zip(r, params):  # float32, 20 elements a row: the norms agree to a few ulps
            torch.testing.assert_close(p.grad[i], q.grad, rtol=1e-6, atol=0)


def set_rows(params, rows: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for i, tensors in enumerate(rows):
            for p, v in zip(params, tensors):
                p[i].copy_(v)


@pytest.mark.parametrize("method", ["singlora", "lora"])
@torch.no_grad()
def test_routed_bank_equals_each_sample_through_its_own_adapter(method, tiny_unet):
    """Rows with different adapters (and, for SingLoRA, different u): sample b routed to row index[b] ==
    that adapter alone on sample b, in float64."""
    tiny_unet.double()
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 5, 48, generator=g,
                                                                                      dtype=torch.float64)
    t, index = torch.tensor([10, 300, 600, 900]), [2, 0, 1, 0]
    add_adapter(tiny_unet, SingLoRAConfig(method=method, rank=4, ramp_steps=4, init="rank"))
    staging = [p.detach().clone() for p in trainable_parameters(tiny_unet)]
    set_step(tiny_unet, 0)  # SingLoRA: u = 0, the staging adapter is off; LoRA: B = 0
    stock = tiny_unet(x, t, emb).sample
    rows = [([torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2 for p in trainable_parameters(tiny_unet)],
             step) for step in (4, 2, 1)]
    alone = []
    for b, r in enumerate(index):
        for p, v in zip(trainable_parameters(tiny_unet), rows[r][0]):
            p.copy_(v)
        set_step(tiny_unet, rows[r][1])
        alone.append(tiny_unet(x[b:b + 1], t[b:b + 1], emb[b:b + 1]).sample)
    alone = torch.cat(alone)
    for p, v in zip(trainable_parameters(tiny_unet), staging):
        p.copy_(v)
    set_step(tiny_unet, 0)
    routing = add_bank(tiny_unet, 3)
    assert sorted(bank_state_dict(tiny_unet)) == sorted(adapter_state_dict(tiny_unet))  # a single adapter's names
    set_rows(bank_parameters(tiny_unet), [r for r, _ in rows])
    routing.set_coef(torch.tensor([1.0, 0.5, 0.25]) if method == "singlora" else 1.0)  # alpha / r = 1, u = step / 4
    assert get_routing(tiny_unet) is routing
    torch.testing.assert_close(tiny_unet(x, t, emb).sample, stock, rtol=0, atol=0)  # nothing routed: the staging
    routing.route(torch.tensor(index))
    routed = tiny_unet(x, t, emb).sample
    assert (alone - stock).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(routed, alone, rtol=FP64_TOL, atol=FP64_TOL)
    routing.route(torch.tensor([0, 1]))
    with pytest.raises(UserError, match="2 entries for a batch of 4"):
        tiny_unet(x, t, emb)
    remove_adapter(tiny_unet)
    assert torch.equal(tiny_unet(x, t, emb).sample, stock)


def test_merged_lora_staging_refuses_routing(tiny_unet):
    from dreambooth_singlora.adapter import merge_adapter

    g = torch.Generator().manual_seed(0)
    x, emb, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 48, generator=g), torch.tensor([1, 2])
    add_adapter(tiny_unet, SingLoRAConfig(method="lora", rank=4))
    routing = add_bank(tiny_unet, 2)
    merge_adapter(tiny_unet)
    routing.route(torch.tensor([0, 1]))
    with pytest.raises(UserError, match="merged"):
        tiny_unet(x, t, emb)


class FakeData:
    """What TrainData.batch returns, from a seed per subject: (latents (m, 4, 8, 8), emb (m, 5, 48), gen)."""

    def __init__(self, seed: int, m: int):
        self.seed, self.m, self.gen = seed, m, torch.Generator()

    def batch(self, step, micro):
        self.gen.manual_seed(self.seed * 1000 + step * 10 + micro)
        emb = torch.randn(1, 5, 48, generator=self.gen).expand(self.m, -1, -1)
        return torch.randn(self.m, 4, 8, 8, generator=self.gen), {"encoder_hidden_states": emb}, self.gen


@pytest.mark.parametrize("method", ["singlora", "lora"])
@pytest.mark.parametrize("prior_w", [None, 0.5], ids=["plain", "prior"])
def test_group_loss_gives_each_subject_its_single_run_gradient(method, prior_w, tiny_unet, tiny_pipeline):
    """One step, float64: the sum over subjects of each subject's mean loss gives bank row s exactly the
    gradient subject s's own single adapter gets (SingLoRA's A; PEFT LoRA's lora_A and lora_B)."""
    from diffusers import DDPMScheduler

    with float64():
        tiny_unet.double()
        sched = noise_schedule(DDPMScheduler.from_pretrained(tiny_pipeline, subfolder="scheduler"))
        m = 2 if prior_w else 1  # per subject: instance (and class) samples
        datas = [FakeData(s, m) for s in range(3)]
        add_adapter(tiny_unet, SingLoRAConfig(method=method, rank=4, ramp_steps=0))
        g = torch.Generator().manual_seed(0)
        rows = [[torch.randn(p.shape, generator=g) * 0.2 for p in trainable_parameters(tiny_unet)] for _ in range(3)]
        denoise = T.Denoise(tiny_unet, torch.float64, ["encoder_hidden_states"])
        single_losses, single_grads = [], []
        for s in range(3):
            params = trainable_parameters(tiny_unet)
            with torch.no_grad():
                for p, v in zip(params, rows[s]):
                    p.copy_(v)
                    p.grad = None
            loss = T.group_losses(denoise, sched, [datas[s]], 3, 1, prior_w, torch.float64)
            loss.sum().backward()
            single_losses.append(loss.item())
            single_grads.append([p.grad.clone() for p in params])
        routing = add_bank(tiny_unet, 3)
        set_rows(bank_parameters(tiny_unet), rows)
        routing.route(torch.arange(3).repeat_interleave(m))
        losses = T.group_losses(denoise, sched, datas, 3, 1, prior_w, torch.float64)
        losses.sum().backward()
    np.testing.assert_allclose(losses.tolist(), single_losses, rtol=FP64_TOL)
    for s in range(3):
        scale = max(gr.abs().max().item() for gr in single_grads[s])
        err = max((p.grad[s] - gr).abs().max().item() for p, gr in zip(bank_parameters(tiny_unet), single_grads[s]))
        assert scale > 0 and err < FP64_TOL * scale, (s, err, scale)


# --------------------------------------------------------------------------- training

def test_several_subjects_in_one_batch_equal_single_runs(runs, tiny_unet):
    method, root = runs
    for s in SUBJECTS:
        single, multi = root / "single" / s, root / "multi" / s
        a, b = weights(single), weights(multi)
        assert next(iter(a.values())).dtype == torch.float64  # the run was float64
        assert rel_diff(a, b) < FP64_TOL
        if method != "singlora":
            assert any("lora_B" in k for k in a)
        init = weights(root / "single" / s / "checkpoints" / "checkpoint-4")  # a point on the way: it trained
        assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e6 * FP64_TOL * max(a[k].abs().max().item() for k in a)
        ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (single, multi))
        assert ca == cb and ca["method"] == method  # same format, same settings, step and u
        for f in ("README.md", "loss_curve.png", "train_stats.json"):
            assert (multi / f).stat().st_size > 0
        hist_single = json.loads((single / "train_stats.json").read_text())["loss_history"]
        hist_multi = json.loads((multi / "train_stats.json").read_text())["loss_history"]
        assert [h[0] for h in hist_multi] == [h[0] for h in hist_single] == [2, 4, 6]
        np.testing.assert_allclose([h[1] for h in hist_multi], [h[1] for h in hist_single], rtol=FP64_TOL)
    assert rel_diff(weights(root / "multi" / "dog"), weights(root / "multi" / "cat")) > 1e-4  # subjects differ
    ckpts = list_checkpoints(root / "multi" / "checkpoints")  # one format: the bank's checkpoints are kept
    assert [p.name for p in ckpts] == ["checkpoint-4", "checkpoint-6"] and (ckpts[-1] / "bank.safetensors").is_file()
    stats = json.loads((root / "multi" / "train_stats.json").read_text())
    assert stats["trained"] == list(SUBJECTS) and stats["batches"][0]["steps_run"] == STEPS
    assert load_adapter(tiny_unet, root / "multi" / "dog").method == method


def test_batches_of_one_crash_and_resume(tiny_pipeline, dataset_dir, tmp_path, monkeypatch):
    """--subjects_per_batch 1: the first subject's adapter is written when its group ends; a crash in the
    second group loses only that group's steps since its last checkpoint; resume 'latest' skips the
    finished subject and ends with what the uninterrupted run gives (exactly: same code, same data)."""
    out = tmp_path / "multi1"
    flags = base(tiny_pipeline, dataset_dir, subjects=list(SUBJECTS), subjects_per_batch=1, output_dir=str(out))
    real = T.save_checkpoint

    def crash_after_cat_step_4(root, step, write, optimizer, sched, state, limit):
        path = real(root, step, write, optimizer, sched, state, limit)
        if state["subjects"] == ["cat"] and step == 4:
            raise KeyboardInterrupt  # a kill
        return path

    monkeypatch.setattr(T, "save_checkpoint", crash_after_cat_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**flags))
    assert (out / "dog" / "adapter_model.safetensors").is_file() and not (out / "cat").exists()
    dog_written = (out / "dog" / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(T, "save_checkpoint", real)
    train(TrainConfig(**flags, resume_from_checkpoint="latest"))
    assert (out / "dog" / "adapter_model.safetensors").stat().st_mtime_ns == dog_written  # finished: not redone
    assert json.loads((out / "train_stats.json").read_text())["trained"] == ["cat"]
    assert json.loads((out / "cat" / "train_stats.json").read_text())["steps_run"] == STEPS - 4
    uninterrupted = tmp_path / "ref"
    train(TrainConfig(**base(tiny_pipeline, dataset_dir, subject="cat", output_dir=str(uninterrupted))))
    assert rel_diff(weights(uninterrupted), weights(out / "cat")) == 0.0  # a group of one is the plain run


def test_sigkill_mid_several_subject_run_then_resume_equals_uninterrupted(tiny_pipeline, dataset_dir, tmp_path):
    """A real SIGKILL in the middle of step 5 of a two-subject run with a cosine schedule with warm-up; the
    same command with --resume_from_checkpoint latest ends with exactly the adapters of an uninterrupted
    run (the bank, AdamW's state and the schedule are restored from checkpoint-4)."""
    flags = ["--subjects", *SUBJECTS, "--pretrained_model_name_or_path", str(tiny_pipeline), "--dataset_dir",
             dataset_dir, "--resolution", "32", "--max_train_steps", "8", "--checkpointing_steps", "2", "--log_every",
             "2", "--ramp_steps", "3", "--mixed_precision", "no", "--report_to", "none", "--lr_scheduler", "cosine",
             "--lr_warmup_steps", "2", "--learning_rate", "1e-2", "--random_flip"]
    assert killed_run([*flags, "--output_dir", str(tmp_path / "killed")], 5, tmp_path) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "killed" / "dog").exists()
    T.main([*flags, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "latest"])
    T.main([*flags, "--output_dir", str(tmp_path / "ref")])
    for s in SUBJECTS:
        assert json.loads((tmp_path / "killed" / s / "train_stats.json").read_text())["steps_run"] == 4
        assert rel_diff(weights(tmp_path / "ref" / s), weights(tmp_path / "killed" / s)) == 0.0


def test_out_of_memory_names_the_setting_and_keeps_finished_subjects(tiny_pipeline, dataset_dir, tmp_path,
                                                                      monkeypatch):
    real, calls = T.group_losses, []

    def oom_in_second_group(denoise, sched, datas, *a, **k):
        calls.append(len(datas))
        if len(calls) > 2 * 2:  # group 1 (dog) takes 2 steps x 2 micro-batches
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(denoise, sched, datas, *a, **k)

    monkeypatch.setattr(T, "group_losses", oom_in_second_group)
    cfg = TrainConfig(**base(tiny_pipeline, dataset_dir, output_dir=str(tmp_path), max_train_steps=2,
                             subjects=list(SUBJECTS), subjects_per_batch=1))
    with pytest.raises(UserError, match=r"out of GPU memory.*--subjects_per_batch.*finished subjects are saved"):
        train(cfg)
    assert json.loads((tmp_path / "dog" / "adapter_config.json").read_text())["step"] == 2


def test_dora_trains_one_subject_at_a_time(tiny_pipeline, dataset_dir, tmp_path, tiny_unet):
    flags = base(tiny_pipeline, dataset_dir, output_dir=str(tmp_path), method="dora", max_train_steps=1,
                 gradient_accumulation_steps=1, subjects=list(SUBJECTS))
    with pytest.raises(UserError, match="--subjects_per_batch 1"):  # a bank cannot: the way that works is named
        train(TrainConfig(**flags))
    train(TrainConfig(**flags, subjects_per_batch=1))
    for s in SUBJECTS:
        meta = json.loads((tmp_path / s / "adapter_config.json").read_text())
        assert meta["method"] == "dora" and meta["step"] == 1
    add_adapter(tiny_unet, SingLoRAConfig(method="dora"))
    with pytest.raises(UserError, match="DoRA subjects train and render one at a time"):
        add_bank(tiny_unet, 2)


@pytest.mark.parametrize("argv,match", [
    (["--subjects", "dog", "--subject", "cat"], "single-subject flag"),
    (["--subjects", "dog", "nope"], "unknown subject 'nope'"),
    (["--subjects", "dog", "dog"], "listed twice"),
    (["--subjects", "dog"], "--subjects needs --dataset_dir"),
    (["--subjects", "dog", "cat", "--mixed_precision", "bf16", "--use_8bit_adam", "--dataset_dir", "{data}"],
     "8-bit Adam"),
    (["--subjects", "dog", "cat", "--dataset_dir", "{tmp}"], "no photo folder for 2 subject(s)"),
    (["--subject", "dog", "--subjects_per_batch", "2", "--dataset_dir", "{data}"], "goes with --subjects"),
], ids=["single-flag", "unknown", "twice", "no-dataset", "8bit", "no-photos", "per-batch-alone"])
def test_cli_bad_input_is_one_line_before_any_model_loads(argv, match, tiny_pipeline, dataset_dir, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(T.Base, "load", lambda *a: pytest.fail("a model loaded before the input was checked"))
    argv = [a.replace("{data}", dataset_dir).replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        T.main([*argv, "--pretrained_model_name_or_path", str(tiny_pipeline), "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


# --------------------------------------------------------------------------- rendering

def make_adapters(tiny_pipeline, tiny_unet, root: Path) -> dict:
    """Two SingLoRA adapters with strong, different updates (different A, alpha and u), two LoRA, one DoRA."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, method, alpha, step in (("one", "singlora", 8.0, 4), ("two", "singlora", 4.0, 2),
                                      ("lora", "lora", 8.0, 0), ("lora2", "lora", 4.0, 0), ("dora", "dora", 8.0, 0)):
        add_adapter(tiny_unet, SingLoRAConfig(method=method, rank=8, alpha=alpha, ramp_steps=4, init="rank"))
        with torch.no_grad():
            for p in trainable_parameters(tiny_unet):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        set_step(tiny_unet, step)
        out[name] = save_adapter(tiny_unet, root / name, base_model=str(tiny_pipeline))
        remove_adapter(tiny_unet)
    return out


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_mixed_batch_images_equal_one_subject_at_a_time(tiny_pipeline, tiny_unet, tmp_path, monkeypatch):
    from dreambooth_singlora import generate
    from dreambooth_singlora.generate import GenerateConfig, generate_images, load_pipeline

    adapters = make_adapters(tiny_pipeline, tiny_unet, tmp_path / "adapters")
    prompts = {n: ["a photo of sks dog"] for n in adapters}
    cfg = GenerateConfig(adapter=str(adapters["one"]), num_images_per_prompt=2, num_inference_steps=2,
                         batch_size=3, guidance_scale=7.5, merge=False)  # batches of 3: mixed subjects
    pipe = load_pipeline(None, str(tiny_pipeline), device="cpu", dtype="fp32")
    result = generate_many(pipe, adapters, cfg, tmp_path / "mixed", prompts)
    assert result["batched"] == ["one", "two", "lora", "lora2"] and result["one_at_a_time"] == ["dora"]
    assert result["images"] == 5 * 1 * 2
    for name, folder in adapters.items():
        ref = load_pipeline(folder, device="cpu", dtype="fp32", merge=False)
        generate_images(ref, cfg, prompts[name], tmp_path / "alone" / name)
        for f in sorted((tmp_path / "alone" / name).glob("*/*.png")):
            rel = f.relative_to(tmp_path / "alone")
            assert np.abs(png(f) - png(tmp_path / "mixed" / rel)).max() <= 1, rel
        assert (tmp_path / "mixed" / name / "index.json").is_file()
    for pair in (("one", "two"), ("lora", "lora2")):
        a, b = (png(tmp_path / "mixed" / n / "a-photo-of-sks-dog" / "0.png") for n in pair)
        assert np.abs(a - b).mean() > 1  # same prompt and seed, other adapter: other image
    assert no_adapter_left(pipe.unet)
    # --compile (dynamo tracing with the eager backend here: inductor's C++ build takes a minute on a CPU)
    monkeypatch.setattr(generate, "COMPILE_OPTIONS", {"backend": "eager"})
    some = {n: adapters[n] for n in ("one", "two")}  # 4 images in batches of 3, the last padded: one trace
    result = generate_many(pipe, some, replace(cfg, compile=True), tmp_path / "compiled", prompts)
    assert result["images"] == 4 and len(result["batch_seconds"]) == 2
    assert len(list((tmp_path / "compiled").glob("*/*/*.png"))) == 4  # the padding's images are dropped
    for f in sorted((tmp_path / "compiled").glob("*/*/*.png")):
        assert np.abs(png(f) - png(tmp_path / "mixed" / f.relative_to(tmp_path / "compiled"))).max() <= 1, f
    assert pipe.unet._compiled_call_impl is None and pipe.vae.decoder._compiled_call_impl is None
    assert no_adapter_left(pipe.unet)
    # DoRA renders on its own, merged, with --adapter_scale applied as generate applies it
    add_adapter(tiny_unet, SingLoRAConfig(method="dora", rank=8, alpha=8.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in tiny_unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))  # a strong update
    dora = save_adapter(tiny_unet, tmp_path / "dora-strong", base_model=str(tiny_pipeline))
    remove_adapter(tiny_unet)
    one_prompt = {"dora": prompts["dora"][:1]}
    for scale in (1.0, 0.5):
        c = replace(cfg, adapter=str(dora), adapter_scale=scale)
        generate_many(pipe, {"dora": dora}, c, tmp_path / f"many-{scale}", one_prompt)
        ref = load_pipeline(dora, device="cpu", dtype="fp32", adapter_scale=scale)
        generate_images(ref, replace(c, merge=True), one_prompt["dora"], tmp_path / f"alone-{scale}")
        for f in sorted((tmp_path / f"alone-{scale}").glob("*/*.png")):
            assert np.abs(png(f) - png(tmp_path / f"many-{scale}" / "dora" / f.relative_to(f.parents[1]))).max() <= 1
    a, b = (png(tmp_path / f"many-{scale}" / "dora" / "a-photo-of-sks-dog" / "0.png") for scale in (1.0, 0.5))
    assert np.abs(a - b).mean() > 0.2  # seen 0.56 (DoRA keeps each row's norm); unscaled it would be 0


def no_adapter_left(unet) -> bool:
    """After generate_many the pipeline's UNet has no adapter left on it."""
    from dreambooth_singlora.adapter import get_config

    return get_config(unet) is None and not any(isinstance(a.processor, BankProcessor)
                                                for _, a in attention_modules(unet))


def test_groups_do_not_prune_each_others_checkpoints(tiny_pipeline, dataset_dir, tmp_path, monkeypatch):
    """Three subjects in groups of 2 and 1 share <output_dir>/checkpoints and its step names: a finished group's
    checkpoints go once its adapters are written, and the limit prunes only the group's own."""
    out = tmp_path / "run"
    flags = base(tiny_pipeline, dataset_dir, subjects=["dog", "cat", "backpack"], subjects_per_batch=2,
                 output_dir=str(out), max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2,
                 gradient_accumulation_steps=1)
    real = T.save_checkpoint

    def crash_in_backpack_after_step_3(root, step, write, optimizer, sched, state, limit):
        path = real(root, step, write, optimizer, sched, state, limit)
        if state["subjects"] == ["backpack"] and step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(T, "save_checkpoint", crash_in_backpack_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**flags))
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root, ["backpack"])] == ["checkpoint-2", "checkpoint-3"]
    assert list_checkpoints(root, ["dog", "cat"]) == []  # written, then removed
    monkeypatch.setattr(T, "save_checkpoint", real)
    train(TrainConfig(**flags))  # resumes backpack from its own checkpoint-3
    assert json.loads((out / "backpack" / "train_stats.json").read_text())["steps_run"] == 1
