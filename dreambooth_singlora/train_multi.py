"""DreamBooth on many subjects at once: one process, one frozen UNet, a bank of SingLoRA / LoRA / LoRA+ adapters.

    python -m dreambooth_singlora.train_multi --subjects all --dataset_dir ../shared/dreambooth/dataset \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --output_dir runs/singlora

Every adapted projection holds one SingLoRA A per subject, (S, D, r) (LoRA: one lora_A and one
lora_B per subject); each sample of a batch goes through its own subject's adapter (batched matmuls,
no per-subject loop inside the UNet). Subject s draws at step t exactly the data a single-subject
run (train_dreambooth, same flags and seed) draws at step t; the loss is the sum over subjects of each subject's mean loss, gradients are
clipped per subject and AdamW's state is per element, so each subject's adapter is the one its
own single-subject run would give (up to float rounding). All subjects of a batch step together:
they share the step count, the ramp u(t) and the learning-rate schedule, as separate runs with the
same flags would.

Result: <output_dir>/<subject>/ holds what a single-subject run writes (adapter_model.safetensors,
adapter_config.json, README.md, loss_curve.png, train_stats.json), so generate, export and eval
use it unchanged. --subjects_per_batch N trains N subjects at a time (default: all); each batch's
adapters are written, atomically, as soon as it finishes. Checkpoints of the batch's whole bank go
to <output_dir>/checkpoints/; --resume_from_checkpoint latest skips finished subjects and resumes
the batch in progress.

--method dora is not batched (its per-row weight norm): it falls back to one subject at a time
(train_dreambooth's train() per subject, same output layout).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import (adapter_state_dict, add_adapter, load_adapter_state_dict, read_adapter,
                      remove_adapter)
from .config import TrainConfig, dataclass_parser
from .errors import UserError, cli_entry
from .fileio import atomic_path, write_json_atomic, write_text_atomic
from .multi import BANKED, add_bank, bank_parameters, bank_state_dict, clip_grad_norm_per_row_, save_subject
from .prompts import get_subject, slugify, subjects
from .singlora import ramp
from .train_dreambooth import (TrainData, _jsonable, _sync_time, commit_checkpoint, list_checkpoints, load_models,
                               load_optimizer_state, make_optimizer, model_card, plot_loss, save_optimizer_state,
                               train)

logger = logging.getLogger("dreambooth_singlora.train_multi")
CHECKPOINTS = "checkpoints"
BANK_NAME = "bank.safetensors"
#: Settings that belong to one subject; every other TrainConfig field must be the same for all.
PER_SUBJECT = ("subject", "instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "output_dir")
#: Single-subject flags the multi-subject command does not take.
NOT_IN_MULTI = ("subject", "instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir",
                "validation_prompt")
ADAPTER_KEYS = ("method", "rank", "alpha", "target_modules", "init", "ramp_steps")


def _name(cfg: TrainConfig) -> str:
    return Path(cfg.output_dir).name


# --------------------------------------------------------------------------- subjects -> configs

def subject_configs(names, base: dict) -> list[TrainConfig]:
    """One single-subject TrainConfig per DreamBooth subject ('all': all 30), output in <output_dir>/<subject>/.

    `base` holds the shared settings (TrainConfig fields). With prior preservation, subjects of one
    class share <output_dir>/class_images/<class prompt>/: the class images depend only on the class
    prompt and the seed, so they are the ones each single run would generate for itself."""
    names = list(names)
    if names == ["all"]:
        names = list(subjects())
    elif "all" in names:
        raise UserError("--subjects takes 'all' alone, or a list of subject names")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"subject(s) listed twice: {', '.join(dups)}")
    known = {n: get_subject(n) for n in names}
    if not base.get("dataset_dir"):
        raise UserError("--dataset_dir is required: the DreamBooth dataset folder (<dataset_dir>/<subject>/*.jpg)")
    root = Path(base.get("output_dir") or TrainConfig.output_dir)
    cfgs = []
    for n, subj in known.items():
        extra = {"subject": n, "output_dir": str(root / n)}
        if base.get("with_prior_preservation"):
            extra["class_data_dir"] = str(root / "class_images" / slugify(subj.class_prompt()))
        cfgs.append(TrainConfig(**{**base, **extra}))
    missing = [_name(c) for c in cfgs if not Path(c.instance_data_dir).is_dir()]
    if missing:
        raise UserError(f"no photo folder for {len(missing)} subject(s) in {base['dataset_dir']}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return cfgs


def check_shared(cfgs: list[TrainConfig]) -> None:
    """UserError unless the configs differ only in the per-subject fields and output folder names."""
    names = [_name(c) for c in cfgs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"two subjects would write to output folders of the same name: {', '.join(dups)}")
    ref = cfgs[0].to_dict()
    for c in cfgs[1:]:
        d = c.to_dict()
        for k, v in ref.items():
            if k not in PER_SUBJECT and d[k] != v:
                raise UserError(f"subjects {names[0]} and {_name(c)} differ in {k} ({v!r} vs {d[k]!r}): a "
                                "multi-subject run shares every setting but each subject's photos, prompts and "
                                "output folder")


def finished(cfg: TrainConfig) -> bool:
    """Whether cfg.output_dir already holds this subject's final adapter (same settings, last step)."""
    try:
        meta, _ = read_adapter(cfg.output_dir)
    except UserError:
        return False
    ours = cfg.adapter_config().to_dict()
    return meta.get("step") == cfg.max_train_steps and all(meta.get(k) == ours[k] for k in ADAPTER_KEYS)


# --------------------------------------------------------------------------- one step's loss

def group_losses(unet, noise_scheduler, datas: list[TrainData], step: int, micro: int,
                 prior_loss_weight: float | None, dtype: torch.dtype) -> torch.Tensor:
    """Each subject's diffusion loss (S,) for one micro-batch, in one UNet call.

    Subject i's latents, noise and timesteps are drawn from its own TrainData exactly as
    `compute_loss` draws them in a single-subject run; the batch is subject-major
    ([subject 0's samples, subject 1's, ...], instance then class samples within a subject)."""
    lat, emb, noise, ts = [], [], [], []
    for d in datas:
        latents, e, gen = d.batch(step, micro)
        noise.append(torch.randn(latents.shape, generator=gen, device=latents.device))  # compute_loss's order
        ts.append(torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                generator=gen, device=latents.device))
        lat.append(latents)
        emb.append(e)
    latents, noise, t, emb = torch.cat(lat), torch.cat(noise), torch.cat(ts), torch.cat(emb)  # (S*m, ...)
    noisy = noise_scheduler.add_noise(latents, noise, t).to(dtype)
    dev = latents.device.type
    with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
        pred = unet(noisy, t, emb).sample.float()
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    parts = 1 if prior_loss_weight is None else 2
    err = (pred - target).square().view(len(datas), parts, -1).mean(-1)  # (S, 1 | 2): instance, class
    return err[:, 0] if prior_loss_weight is None else err[:, 0] + prior_loss_weight * err[:, 1]


# --------------------------------------------------------------------------- bank checkpoints

def _subjects_of(path: Path) -> list[str]:
    try:
        return json.loads((path / "trainer_state.json").read_text())["subjects"]
    except (OSError, ValueError, KeyError):
        return []


def save_bank_checkpoint(cfg: TrainConfig, root: Path, names: list[str], unet, optimizer, lr_scheduler,
                         step: int, histories: dict) -> Path:
    """<root>/checkpoints/checkpoint-<step>/: the bank (safetensors), AdamW state, schedule, loss histories.

    Written into a temporary folder and renamed into place, as the single-subject trainer does."""
    from safetensors.torch import save_file

    ckroot = root / CHECKPOINTS
    final, tmp = ckroot / f"checkpoint-{step}", ckroot / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with atomic_path(tmp / BANK_NAME) as part:  # fsynced: a committed checkpoint never holds a short file
        save_file({k: v.detach().cpu().contiguous() for k, v in bank_state_dict(unet).items()}, str(part),
                  metadata={"format": "pt", "subjects": json.dumps(names)})
    optimizer_state = save_optimizer_state(optimizer, tmp)
    shared = {k: v for k, v in cfg.to_dict().items() if k not in PER_SUBJECT}
    write_json_atomic(tmp / "trainer_state.json", {
        "step": step, "subjects": names, "optimizer": optimizer_state,
        "lr_scheduler": _jsonable(lr_scheduler.state_dict()), "histories": histories,
        "adapter": cfg.adapter_config().to_dict(), "config": shared})
    return commit_checkpoint(tmp, final, cfg.checkpoints_total_limit)


def load_bank_checkpoint(cfg: TrainConfig, root: Path, names: list[str], unet, optimizer,
                         lr_scheduler) -> tuple[int, dict]:
    """Restore bank, AdamW state and schedule from --resume_from_checkpoint; returns (step, histories).
    'latest' whose subjects are not this batch's (another --subjects_per_batch): start the batch at step 0."""
    from safetensors.torch import load_file

    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(root / CHECKPOINTS)
        if not found:
            logger.info("no checkpoint in %s: starting from step 0", root / CHECKPOINTS)
            return 0, {}
        path = found[-1]
        if _subjects_of(path) != names:
            logger.warning("latest checkpoint %s holds subjects %s, not this batch's %s: starting this batch "
                           "from step 0", path, _subjects_of(path), names)
            return 0, {}
    else:
        path = Path(cfg.resume_from_checkpoint)
    files = [path / f for f in ("trainer_state.json", BANK_NAME, "optimizer.safetensors")]
    if not all(f.is_file() for f in files):
        raise UserError(f"{path} is not a multi-subject checkpoint (it needs trainer_state.json, {BANK_NAME} and "
                        "optimizer.safetensors)")
    state = json.loads(files[0].read_text())
    if state["subjects"] != names:
        raise UserError(f"checkpoint {path} holds subjects {state['subjects']}, this batch is {names}: resume with "
                        "the same --subjects and --subjects_per_batch, or use 'latest'")
    ours = cfg.adapter_config().to_dict()
    for key in ADAPTER_KEYS:
        if state["adapter"].get(key) != ours[key]:
            raise UserError(f"checkpoint {path} was trained with {key}={state['adapter'].get(key)!r}, this run has "
                            f"{ours[key]!r}: resume with the same settings or start a new --output_dir")
    bank, own = load_file(str(files[1])), bank_state_dict(unet)
    if set(bank) != set(own) or any(tuple(bank[k].shape) != tuple(own[k].shape) for k in own):
        raise UserError(f"checkpoint {path} does not fit this UNet's adapter bank (another base model?)")
    with torch.no_grad():
        for k, v in bank.items():
            own[k].copy_(v)
    load_optimizer_state(optimizer, path, state["optimizer"])
    lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **state["lr_scheduler"]})
    logger.info("resumed %s from %s at step %d", ", ".join(names), path, state["step"])
    return int(state["step"]), state.get("histories", {})


# --------------------------------------------------------------------------- the loop

def _check_supported(cfg: TrainConfig, accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        raise UserError("multi-subject training runs in one process on one GPU: start it with python, not "
                        "accelerate launch on several processes (or split --subjects between runs)")
    if (accelerator.mixed_precision if accelerator is not None else cfg.mixed_precision) == "fp16":
        raise UserError("multi-subject training supports --mixed_precision bf16 or no, not fp16 (fp16's loss "
                        "scaling would skip every subject's step when one overflows)")
    if cfg.use_8bit_adam:
        raise UserError("--use_8bit_adam is not supported in multi-subject mode: its block-wise quantisation "
                        "would couple subjects (AdamW state of an adapter bank is small: 8 bytes per parameter)")
    if cfg.validation_prompt:
        raise UserError("--validation_prompt is not supported in multi-subject mode; render the adapters "
                        "afterwards with `python -m dreambooth_singlora.multi`")


def _train_group(cfg, group: list[TrainConfig], datas: list[TrainData], models, root: Path, init: dict,
                 accelerator, dtype) -> dict:
    """Train one batch of subjects (all stepping together) and write each one's folder; returns stats."""
    from diffusers.optimization import get_scheduler

    device, unet = accelerator.device, models.unet
    names, k = [_name(c) for c in group], len(group)
    load_adapter_state_dict(unet, init)  # every subject starts from the seed's A, as its own run would
    routing = add_bank(unet, k)
    params = bank_parameters(unet)
    n_params = sum(t.numel() for t in adapter_state_dict(unet).values())
    optimizer = make_optimizer(cfg, unet, device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    step, histories = 0, {}
    if cfg.resume_from_checkpoint:
        step, histories = load_bank_checkpoint(cfg, root, names, unet, optimizer, lr_scheduler)
    histories = {n: histories.get(n, []) for n in names}
    per = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)  # samples per subject per UNet call
    routing.route(torch.arange(k, device=device).repeat_interleave(per))
    prior_w = cfg.prior_loss_weight if cfg.with_prior_preservation else None
    scale, u_set = cfg.alpha / cfg.rank, None
    ramped = cfg.method == "singlora"  # LoRA / LoRA+ have no ramp: u = 1, as set_step gives them
    logger.info("training %d subject(s) together (%d samples per UNet call): %s", k, k * per, ", ".join(names))
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc=f"training {k} subjects")
    loss_sum, n_sum, t0 = torch.zeros(k, device=device), 0, time.time()

    unet.train()
    first_step, loop_start = step, _sync_time(device)
    while step < cfg.max_train_steps:
        u = ramp(step, cfg.ramp_steps) if ramped else 1.0
        if u != u_set:  # past the ramp: no kernel per step
            routing.set_coef(scale * u)
            u_set = u
        for micro in range(cfg.gradient_accumulation_steps):
            losses = group_losses(unet, models.noise_scheduler, datas, step, micro, prior_w, dtype)  # (k,)
            (losses.sum() / cfg.gradient_accumulation_steps).backward()
            loss_sum += losses.detach() / cfg.gradient_accumulation_steps
        if cfg.max_grad_norm > 0:
            clip_grad_norm_per_row_(params, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, n_sum = step + 1, n_sum + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_train_steps:
            means = (loss_sum / n_sum).tolist()  # the only host sync, every log_every steps
            loss_sum.zero_()
            n_sum = 0
            bad = [n for n, m in zip(names, means) if not math.isfinite(m)]
            if bad:
                _non_finite(bad, step, root)
            for n, m in zip(names, means):
                histories[n].append([step, m])
            bar.set_postfix(loss=f"{sum(means) / k:.4f}", u=f"{ramp(step, cfg.ramp_steps) if ramped else 1.0:.2f}")
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            ok = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in params]).all(0).tolist()  # (k,)
            if not all(ok):
                _non_finite([n for n, good in zip(names, ok) if not good], step, root)
            save_bank_checkpoint(cfg, root, names, unet, optimizer, lr_scheduler, step, histories)
    bar.close()
    loop_seconds = _sync_time(device) - loop_start
    routing.route(None)

    # each subject's folder, as a single-subject run writes it (each file atomically)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    for i, c in enumerate(group):
        out = Path(c.output_dir)
        save_subject(unet, i, out, step, base_model=c.pretrained_model_name_or_path)
        plot_loss(histories[names[i]], out / "loss_curve.png")
        write_text_atomic(out / "README.md", model_card(c, step, n_params, time.time() - t0))
        write_json_atomic(out / "train_stats.json", {
            "steps_run": step - first_step, "loop_seconds": loop_seconds,
            "it_per_s": (step - first_step) / loop_seconds if loop_seconds > 0 else None,
            "peak_gpu_memory_gb": peak, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "cuda_graphs": False, "trainable_parameters": n_params, "num_processes": 1,
            "multi_subject": {"subjects_in_batch": names, "samples_per_unet_call": k * per},
            "loss_history": histories[names[i]]})
    for ck in list_checkpoints(root / CHECKPOINTS):  # this batch is done: its checkpoints are not needed
        if _subjects_of(ck) == names:
            shutil.rmtree(ck, ignore_errors=True)
    logger.info("adapters of %s saved under %s", ", ".join(names), root)
    return {"subjects": names, "steps_run": step - first_step, "loop_seconds": round(loop_seconds, 3),
            "it_per_s": round((step - first_step) / loop_seconds, 3) if loop_seconds > 0 else None,
            "samples_per_s": round((step - first_step) * k * per * cfg.gradient_accumulation_steps / loop_seconds, 2)
            if loop_seconds > 0 else None}


def _non_finite(names: list[str], step: int, root: Path) -> None:
    found = list_checkpoints(root / CHECKPOINTS)
    keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint of this batch was saved before it"
    raise UserError(f"loss of {', '.join(names)} became non-finite by step {step}; training stopped and {keep} "
                    "(subjects of earlier batches are saved). Lower --learning_rate")


def one_at_a_time(cfgs: list[TrainConfig]) -> dict[str, Path]:
    """The fallback for methods the bank does not batch: train_dreambooth's train() per subject."""
    if cfgs[0].resume_from_checkpoint not in (None, "latest"):
        raise UserError("subjects trained one at a time resume with --resume_from_checkpoint latest "
                        "(each from its own <output_dir>/<subject>/checkpoints)")
    logger.warning("method %s is not batched across subjects: training %d subjects one at a time",
                   cfgs[0].method, len(cfgs))
    for c in cfgs:
        if c.resume_from_checkpoint and finished(c):
            logger.info("%s: finished adapter in %s, skipped", _name(c), c.output_dir)
            continue
        train(c)
    return {_name(c): Path(c.output_dir) for c in cfgs}


def train_multi(cfgs: list[TrainConfig], output_dir=None, subjects_per_batch: int | None = None) -> dict[str, Path]:
    """Train one adapter per config (each a single-subject TrainConfig) on one shared frozen UNet.

    The configs must differ only in the subject's photos, prompts and output folder; checkpoints and
    the run's train_stats.json go to `output_dir` (default: the parent of the first subject's folder).
    subjects_per_batch subjects train together (default: all). Returns {subject: adapter folder}.
    SingLoRA, LoRA and LoRA+ are batched; DoRA falls back to one subject at a time (`one_at_a_time`).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not cfgs:
        raise UserError("no subject to train")
    check_shared(cfgs)
    cfg = cfgs[0]
    root = Path(output_dir) if output_dir else Path(cfg.output_dir).parent
    if cfg.method not in BANKED:
        return one_at_a_time(cfgs)
    k = len(cfgs) if subjects_per_batch is None else subjects_per_batch
    if k < 1:
        raise UserError(f"--subjects_per_batch must be >= 1, got {k}")
    if cfg.mixed_precision == "fp16":  # before accelerate, which refuses fp16 without a GPU
        _check_supported(cfg, None)

    # 1. set-up, as train_dreambooth: the same seed before the same model loads gives the same initial A
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    _check_supported(cfg, accelerator)
    set_seed(cfg.seed)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = load_models(cfg, accelerator.device, dtype)

    # 2. data, once per subject (finished subjects skipped when resuming)
    todo = [c for c in cfgs if not (cfg.resume_from_checkpoint and finished(c))]
    for c in cfgs:
        if c not in todo:
            logger.info("%s: finished adapter in %s, skipped", _name(c), c.output_dir)
    datas = [TrainData(c, accelerator, models) for c in todo]
    models.vae = models.text_encoder = None
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
        if cfg.cuda_graphs:
            logger.info("multi-subject mode runs the UNet eagerly (no CUDA graphs): a batch of subjects keeps "
                        "the GPU busy")

    # 3. the adapter (its initial A is every subject's start), then the batches of subjects
    add_adapter(models.unet, cfg.adapter_config(), use_xformers=cfg.enable_xformers_memory_efficient_attention)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    init = {name: v.detach().clone() for name, v in adapter_state_dict(models.unet).items()}
    groups = []
    t0 = time.time()
    for start in range(0, len(todo), k):
        group = todo[start:start + k]
        try:
            groups.append(_train_group(cfg, group, datas[start:start + k], models, root, init, accelerator, dtype))
        except torch.cuda.OutOfMemoryError:
            per = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
            done = [_name(c) for c in todo[:start]]
            raise UserError(
                f"out of GPU memory training {len(group)} subjects together ({len(group) * per} samples of "
                f"{cfg.resolution} px per UNet call): lower --subjects_per_batch (e.g. {max(1, len(group) // 2)}), "
                f"or add --gradient_checkpointing; {len(done)} finished subject(s) are saved under {root}; "
                "run again with --resume_from_checkpoint latest to go on") from None
    remove_adapter(models.unet)
    write_json_atomic(root / "train_stats.json", {
        "subjects": [_name(c) for c in cfgs], "trained": [_name(c) for c in todo], "subjects_per_batch": k,
        "method": cfg.method, "max_train_steps": cfg.max_train_steps, "batches": groups,
        "loop_seconds": round(sum(g["loop_seconds"] for g in groups), 3), "wall_seconds": round(time.time() - t0, 3),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "mixed_precision": accelerator.mixed_precision})
    return {_name(c): Path(c.output_dir) for c in cfgs}


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = dataclass_parser(TrainConfig, "dreambooth-singlora train-multi", __doc__)
    parser.add_argument("--subjects", nargs="+", required=True,
                        help="DreamBooth subjects (names from prompts/subjects.csv), or 'all' for the 30; "
                             "each trains on <dataset_dir>/<subject>/ into <output_dir>/<subject>/")
    parser.add_argument("--subjects_per_batch", type=int, default=None,
                        help="subjects trained together, one UNet batch (default: all); lower it if the GPU "
                             "runs out of memory. Ignored by dora, which runs one subject at a time")
    for action in parser._actions:
        if action.dest in NOT_IN_MULTI:
            action.help = argparse.SUPPRESS
    return parser


@cli_entry
def main(argv=None):
    ns = build_parser().parse_args(argv)
    given = [n for n in NOT_IN_MULTI if getattr(ns, n) is not None]
    if given:
        raise UserError(f"--{given[0]} is a single-subject flag: in multi-subject mode each subject's photos, "
                        "prompts and output folder come from --subjects, --dataset_dir and --output_dir")
    base = {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if getattr(ns, f.name, None) is not None}
    cfgs = subject_configs(ns.subjects, base)
    out = train_multi(cfgs, base.get("output_dir"), ns.subjects_per_batch)
    print(f"{len(out)} adapters in {base.get('output_dir')}/<subject>/")


if __name__ == "__main__":
    main()
