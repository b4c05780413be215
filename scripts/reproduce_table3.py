"""Reproduce the SingLoRA paper's Table 3 (DreamBooth on SD1.5): train, render, score, compare.

    python scripts/reproduce_table3.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset_dir dreambooth/dataset --work_dir table3 --gpus 0 1 2 3

Rows: LoRA r8, LoRA+ r8, DoRA r8, SingLoRA r8, SingLoRA r16, all on the UNet's to_q/to_k, 400 steps,
"a photo of sks <class>". Stages, each resumable (rerun the same command after any interruption):
1. train  <work>/adapters/<row>/<subject>/  one trainer process per (row, subject), up to one per GPU
          at a time (--gpus); an interrupted subject resumes from its last checkpoint; with
          --multi_subject the SingLoRA, LoRA and LoRA+ rows each train all their subjects in one
          batched run (DoRA stays one subject at a time);
2. render <work>/images/<row>/<subject>/<slug>/<k>.png  via
          `accelerate launch -m dreambooth_singlora.eval render` (subjects split over the GPUs, mixed in
          batches of --render_batch_size; --compile for torch.compile; images already there are kept);
3. score  <work>/eval/<row>/  DINO, CLIP-I, CLIP-T (docs/EVAL.md), real-image features shared;
4. report <work>/table3.md (ours beside the paper's numbers) + report.md/csv/json/png/html.

Each stage checks what is already done before it starts anything, so a rerun with nothing left to do
starts no process and loads no model: a (row, subject) is trained when its adapter_config.json has
step == --max_train_steps; rendered when its index.json lists the subject's first --max_prompts prompts
and every <slug>/<k>.png for k < --num_images_per_prompt is there; a row is scored when
<work>/eval/<row>/scores.json covers those subjects and images with the same encoders and is newer
than every index.json of the row (rendering again makes it stale). Delete a folder to redo its stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dreambooth_singlora.errors import cli_entry

# The module that trains many subjects of one row in one process (`python -m <it> --subjects ...`).
MULTI_SUBJECT_TRAINER = "dreambooth_singlora.train_dreambooth"

ROWS = {  # name: (method, rank)
    "lora_r8": ("lora", 8), "loraplus_r8": ("loraplus", 8), "dora_r8": ("dora", 8),
    "singlora_r8": ("singlora", 8), "singlora_r16": ("singlora", 16),
}
PAPER = {  # SingLoRA paper, Table 3: DINO, CLIP-I, CLIP-T
    "lora_r8": (0.143, 0.677, 0.319), "loraplus_r8": (0.150, 0.688, 0.315), "dora_r8": (0.148, 0.687, 0.317),
    "singlora_r8": (0.141, 0.677, 0.318), "singlora_r16": (0.151, 0.690, 0.317),
}


def trained(folder: Path, steps: int) -> bool:
    cfg = folder / "adapter_config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("step") == steps


def multi_subject_train_command(args, row: str, subjects: list[str]) -> list[str]:
    """The one trainer process that trains `subjects` of `row` together (--multi_subject)."""
    method, rank = ROWS[row]
    return [sys.executable, "-m", MULTI_SUBJECT_TRAINER, "--subjects", *subjects,
            "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--dataset_dir",
            str(args.dataset_dir), "--output_dir", str(args.work_dir / "adapters" / row), "--method",
            method, "--rank", str(rank), "--max_train_steps", str(args.max_train_steps),
            "--resolution", str(args.resolution), "--seed", str(args.seed),
            "--mixed_precision", args.mixed_precision, "--resume_from_checkpoint", "latest",
            *args.train_args]


def train_multi_rows(args, rows, subjects) -> list[str]:
    """--multi_subject: each SingLoRA / LoRA / LoRA+ row's subjects trained together in one process
    (docs/MULTI.md); returns the rows it handled. The adapters are those the per-subject runs would give."""
    from dreambooth_singlora.bank import BANKED

    done = []
    for row in rows:
        if ROWS[row][0] not in BANKED:
            continue
        todo = [s for s in subjects if not trained(args.work_dir / "adapters" / row / s, args.max_train_steps)]
        if todo:
            print(f"[train] {row}: {len(todo)} subjects in one multi-subject run", flush=True)
            env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(args.gpus[0])} if args.gpus else {}))
            subprocess.run(multi_subject_train_command(args, row, todo), env=env, check=True)
        else:
            print(f"[train] {row}: all {len(subjects)} subjects already trained", flush=True)
        done.append(row)
    return done


def train_all(args, rows, subjects) -> None:
    """Stage 1: one trainer process per (row, subject), at most one per GPU at a time."""
    if args.multi_subject:
        handled = train_multi_rows(args, rows, subjects)
        rows = [r for r in rows if r not in handled]
    jobs = [(r, s) for r in rows for s in subjects
            if not trained(args.work_dir / "adapters" / r / s, args.max_train_steps)]
    if rows:
        print(f"[train] {len(jobs)} of {len(rows) * len(subjects)} adapters to train", flush=True)
    slots = [str(g) for g in args.gpus] if args.gpus else [None]
    running: dict[str, tuple] = {}
    while jobs or running:
        for slot in slots:
            proc = running.get(slot)
            if proc and proc[0].poll() is not None:
                if proc[0].returncode != 0:
                    raise SystemExit(f"[train] {proc[1]} / {proc[2]} failed (exit {proc[0].returncode}); "
                                     f"log: {proc[3]}. Fix it and rerun: finished subjects are kept")
                print(f"[train] done {proc[1]} / {proc[2]}", flush=True)
                del running[slot]
            if slot not in running and jobs:
                row, subject = jobs.pop(0)
                method, rank = ROWS[row]
                out = args.work_dir / "adapters" / row / subject
                out.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "dreambooth_singlora.train_dreambooth", "--pretrained_model_name_or_path",
                       args.pretrained_model_name_or_path, "--subject", subject, "--dataset_dir", str(args.dataset_dir),
                       "--output_dir", str(out), "--method", method, "--rank", str(rank),
                       "--max_train_steps", str(args.max_train_steps), "--resolution", str(args.resolution),
                       "--resume_from_checkpoint", "latest", "--seed", str(args.seed),
                       "--mixed_precision", args.mixed_precision, *args.train_args]
                env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
                log = out / "train.log"
                running[slot] = (subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT),
                                 row, subject, log)
        time.sleep(0.2)


def expected_prompts(subject: str, max_prompts) -> list[str]:
    """The prompts `render` gives a subject: its first max_prompts evaluation prompts (all 25 if None)."""
    from dreambooth_singlora.prompts import get_subject

    return get_subject(subject).eval_prompts()[:max_prompts]


def rendered(folder: Path, prompts: list[str], n_images: int) -> bool:
    """True when <folder> (one subject's images) holds every image of these prompts: index.json (written
    once a subject is complete) names a folder for each prompt and each holds 0.png .. <n_images-1>.png."""
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        slugs = {rec["prompt"]: rec["slug"] for rec in index["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p in slugs and all((folder / slugs[p] / f"{k}.png").is_file() for k in range(n_images))
               for p in prompts)


def render_todo(images_dir: Path, subjects, max_prompts, n_images: int) -> list[str]:
    """The subjects of one row whose images are not all there yet."""
    return [s for s in subjects
            if not rendered(Path(images_dir) / s, expected_prompts(s, max_prompts), n_images)]


def render_all(args, rows, subjects) -> None:
    """Stage 2: `python -m dreambooth_singlora.eval render` per row, spread over the GPUs by accelerate;
    only rows with images missing are launched, for the subjects missing some."""
    for row in rows:
        todo = render_todo(args.work_dir / "images" / row, subjects, args.max_prompts, args.num_images_per_prompt)
        if not todo:
            print(f"[render] {row}: all {len(subjects)} subjects already rendered", flush=True)
            continue
        n = max(1, min(len(args.gpus), len(todo)))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
        if args.gpus:
            launch += ["--gpu_ids", ",".join(map(str, args.gpus[:n]))]
        cmd = [*launch, "-m", "dreambooth_singlora.eval", "render", "--adapters",
               str(args.work_dir / "adapters" / row), "--output", str(args.work_dir / "images" / row),
               "--subjects", *todo,
               "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
               "--num_images_per_prompt", str(args.num_images_per_prompt), "--seed", str(args.seed)]
        cmd += ["--batch_size", str(args.render_batch_size)] + (["--compile"] if args.compile else [])
        if args.max_prompts:
            cmd += ["--max_prompts", str(args.max_prompts)]
        print(f"[render] {row}: {len(todo)} of {len(subjects)} subjects", flush=True)
        subprocess.run(cmd, check=True)


def current_scores(args, row, subjects) -> dict | None:
    """<work>/eval/<row>/scores.json if it is the score of what is in <work>/images/<row> now (same subjects,
    same number of images, same encoders, written after every index.json of the row), else None."""
    from dreambooth_singlora.eval.report import load_results
    from dreambooth_singlora.errors import UserError

    path = args.work_dir / "eval" / row / "scores.json"
    images = args.work_dir / "images" / row
    indexes = [images / s / "index.json" for s in subjects]
    if not path.is_file() or not all(i.is_file() for i in indexes):
        return None
    try:
        result = load_results(path)
    except UserError:
        return None
    n = sum(len(expected_prompts(s, args.max_prompts)) for s in subjects) * args.num_images_per_prompt
    same = (set(result.get("subjects") or ()) == set(subjects) and result.get("scored", {}).get("images") == n
            and set(result.get("settings", {}).get("encoders") or ()) == set(args.encoders))
    newer = path.stat().st_mtime_ns >= max(i.stat().st_mtime_ns for i in indexes)
    return result if same and newer else None


def score_all(args, rows, subjects) -> dict:
    """Stage 3: score every row with the same encoders and one cache of real-image features; a row whose
    scores.json is current (current_scores) is read back, and no encoder is loaded if none is left."""
    from dreambooth_singlora.eval import ReferenceCache, load_encoders, score_folder, write_score_outputs

    results, encoders, cache = {}, None, None
    for row in rows:
        kept = current_scores(args, row, subjects)
        if kept is not None:
            print(f"[score] {row}: scores.json is current, kept", flush=True)
            results[row] = kept
            continue
        if encoders is None:
            encoders = load_encoders(args.encoders,
                                     checkpoints={"clip": args.clip_checkpoint, "dino": args.dino_checkpoint})
            cache = ReferenceCache(args.dataset_dir)
        print(f"[score] {row}", flush=True)
        results[row] = score_folder(args.work_dir / "images" / row, args.dataset_dir, encoders, subjects=subjects,
                                    cache=cache)
        write_score_outputs(results[row], args.work_dir / "eval" / row, name=row)
    return results


def table3(results: dict) -> str:
    def val(r, m):
        e = r["summary"]["all"].get(m) or {}
        return "-" if e.get("mean") is None else f"{e['mean']:.3f}" + (f" ± {e['std']:.3f}" if e.get("std") else "")

    lines = ["| row | DINO (ours) | DINO (paper) | CLIP-I (ours) | CLIP-I (paper) | CLIP-T (ours) | CLIP-T (paper) |",
             "|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        p = PAPER[row]
        lines.append(f"| {row} | {val(r, 'dino')} | {p[0]:.3f} | {val(r, 'clip_i')} | {p[1]:.3f} | "
                     f"{val(r, 'clip_t')} | {p[2]:.3f} |")
    return "\n".join(lines) + "\n\nours: mean ± std across subject means (EVAL_PROTOCOL.md); paper: SingLoRA Table 3.\n"


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--dataset_dir", type=Path, required=True)
    p.add_argument("--work_dir", type=Path, default=Path("table3"))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--subjects", nargs="+", default=None, help="default: all 30")
    p.add_argument("--stages", nargs="+", default=["train", "render", "score"], choices=["train", "render", "score"])
    p.add_argument("--gpus", nargs="*", type=int, default=[], help="GPU ids to use (default: accelerate's device)")
    p.add_argument("--multi_subject", action="store_true",
                   help="train each SingLoRA, LoRA and LoRA+ row's subjects together in one batched run "
                        "(same adapters, faster; DoRA stays one subject at a time)")
    p.add_argument("--mixed_precision", default="bf16", choices=("no", "fp16", "bf16"),
                   help="training precision (frozen models; adapters stay fp32)")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts per subject (demos)")
    p.add_argument("--render_batch_size", type=int, default=16,
                   help="images per rendering batch (an H100 takes 48: UNet batch 96, 17 GB); lower it if out of memory")
    p.add_argument("--compile", action="store_true",
                   help="render with torch.compile'd UNet and VAE decoder (GPU; 3,000 images in ~14 min instead of "
                        "~21 on an H100, docs/BENCHMARKS.md)")
    p.add_argument("--encoders", nargs="+", default=["clip", "dino"])
    p.add_argument("--clip_checkpoint", default=None)
    p.add_argument("--dino_checkpoint", default=None)
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="extra trainer flags (last)")
    args = p.parse_args(argv)
    from dreambooth_singlora.prompts import subjects as all_subjects

    subjects = args.subjects or list(all_subjects())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if "train" in args.stages:
        train_all(args, args.rows, subjects)
    if "render" in args.stages:
        render_all(args, args.rows, subjects)
    if "score" in args.stages:
        from dreambooth_singlora.eval import write_report

        results = score_all(args, args.rows, subjects)
        write_report(results, args.work_dir / "report", reference=True)
        (args.work_dir / "table3.md").write_text(table3(results))
        print((args.work_dir / "table3.md").read_text())


if __name__ == "__main__":
    main()
