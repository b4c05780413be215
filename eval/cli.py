"""`dreambooth-singlora eval <command>`: score generations, compare methods, measure the real-image bound.

The same CLI is `python -m dreambooth_singlora.eval <command>` anywhere it is installed, and
`python -m eval <command>` from a checkout (the examples below use that spelling).

    python -m eval render --adapters DIR --output DIR [--subjects ...]   (accelerate launch for many GPUs)
    python -m eval score  --images DIR --dataset_dir DIR --output DIR [--encoders clip dino]
                          [--clip_checkpoint F] [--dino_checkpoint F] [--with_identifier] [--dino_patch_tokens]
    python -m eval report --results NAME=DIR [NAME=DIR ...] --output DIR [--reference]
    python -m eval bound  --dataset_dir DIR --output FILE.json
    python -m eval curve  --run DIR --dataset_dir DIR --output DIR [--max_prompts N]   (fidelity over steps)
    python -m eval table3 --pretrained_model_name_or_path M --dataset_dir DIR --work_dir DIR [--rows ...]

render, score, curve and table3 take --events FILE (JSON lines: started, progress, finished/failed;
dreambooth_singlora.events).

Adding a command: write `add_<name>_command(subparsers)` that calls
`subparsers.add_parser(...)`, adds its arguments and sets `func=<run(args) -> int>` with
set_defaults, and append it to COMMANDS (or call it on the subparsers of build_parser()).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dreambooth_singlora.errors import UserError, cli_entry
from dreambooth_singlora.prompts import IDENTIFIER

logger = logging.getLogger(__package__)  # "dreambooth_singlora.eval" installed, "eval" as `python -m eval`


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """--encoders, --clip_checkpoint, --dino_checkpoint, --dino_patch_tokens, --device, --batch_size."""
    # no choices= here: the registry lives beside torch, and --help must not import it; load_encoders
    # refuses an unknown name with the list of registered ones
    p.add_argument("--encoders", nargs="+", default=["clip", "dino"],
                   help="encoders to score with (default: clip dino; clip gives CLIP-I and CLIP-T, dino gives DINO)")
    p.add_argument("--clip_checkpoint", default=None,
                   help="local OpenAI CLIP ViT-B/32 weights: a file (.safetensors, or .bin/.pt state dict) or an "
                        "open_clip model folder; default: download ('ViT-B-32', 'openai')")
    p.add_argument("--dino_checkpoint", default=None,
                   help="local DINO ViT-S/16 weights: a file (.safetensors or .pth state dict) or a timm model "
                        "folder; default: download timm 'vit_small_patch16_224.dino'")
    p.add_argument("--dino_patch_tokens", action="store_true",
                   help="also report the diagnostic 'DINO patch' metric (flattened patch tokens instead of CLS; "
                        "not the protocol)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch_size", type=int, default=32, help="images per encoder forward pass")


def encoders_from_args(args):
    from .encoders import load_encoders

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    checkpoints = {"clip": args.clip_checkpoint, "dino": args.dino_checkpoint}
    return load_encoders(args.encoders, checkpoints=checkpoints, device=args.device,
                         dino_patch_tokens=args.dino_patch_tokens, batch_size=args.batch_size)


# ---------------------------------------------------------------------------------------------
# score

def add_score_command(subparsers) -> None:
    p = subparsers.add_parser("score", help="score a folder of generations against the DreamBooth dataset",
                              description="Score <images>/<subject>/<prompt-slug>/<k>.png against "
                                          "<dataset_dir>/<subject>/*.jpg and write the report to --output.")
    p.add_argument("--images", required=True, help="folder laid out <subject>/<prompt-slug>/<k>.png")
    p.add_argument("--dataset_dir", required=True, help="the DreamBooth dataset (<subject>/NN.jpg)")
    p.add_argument("--output", required=True, help="folder for scores.json and the report files")
    p.add_argument("--name", default=None, help="method name in the report (default: the images folder's name)")
    add_encoder_arguments(p)
    p.add_argument("--with_identifier", action="store_true",
                   help="CLIP-T with the prompt as generated ('a sks dog ...'); default: identifier removed")
    p.add_argument("--identifier", default=IDENTIFIER, help="the rare-token identifier in the prompts (default: sks)")
    p.add_argument("--subjects", nargs="+", default=None,
                   help="subjects expected in the folder (default: all 30; others are reported missing)")
    p.add_argument("--max_prompts", type=int, default=None,
                   help="only the first N of each subject's 25 prompts are expected (what render --max_prompts "
                        "wrote); the others are not reported missing")
    p.add_argument("--reference", action="store_true", help="add the published reference numbers to report.md")
    p.add_argument("--adapters", nargs="+", default=None, metavar="DIR",
                   help="adapter folders to read held-out photos from (adapter_config.json's \"holdout\"): a folder of "
                        "per-subject adapters (<DIR>/<subject>/) or one subject's adapter folder; default: the adapter "
                        "each subject's index.json names")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_events_argument(p)
    p.set_defaults(func=run_score)


def add_events_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", default=None, metavar="FILE",
                   help="append the job's events to FILE as JSON lines (started, progress, finished or failed)")


def run_score(args) -> int:
    from dreambooth_singlora.events import job

    from .holdout import holdouts_from_adapters
    from .report import write_score_outputs
    from .score import check_folders, score_folder

    check_folders(args.images, args.dataset_dir)  # fail before loading the encoders
    holdout = holdouts_from_adapters(args.adapters) if args.adapters else None
    with job("score", args.events) as events:
        events.emit("started", config=dict(images=args.images, dataset_dir=args.dataset_dir, encoders=args.encoders,
                                           output=args.output))
        encoders = encoders_from_args(args)
        result = score_folder(args.images, args.dataset_dir, encoders, with_identifier=args.with_identifier,
                              identifier=args.identifier, subjects=args.subjects, progress=not args.no_progress,
                              holdout=holdout, events=events, max_prompts=args.max_prompts)
        paths = write_score_outputs(result, args.output, name=args.name, reference=args.reference)
    _print_summary(result)
    print(f"skipped or flagged: {len(result['skipped'])} (listed in {paths['md']})")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _print_summary(result: dict) -> None:
    from .report import label, metric_order

    s = result["scored"]
    print(f"scored {s['images']} images ({s['subjects']} subjects, {s['prompts']} prompts)")
    for group in ("all", "object", "live"):
        g = result["summary"][group]
        cells = [f"{label(m)} {g[m]['mean']:.4f}" for m in metric_order({"": result}) if g[m]["mean"] is not None]
        if cells:
            print(f"  {group:<6} " + "  ".join(cells))
    held = result.get("holdout")
    if held:
        from .holdout import summary_cells

        print(f"  held-out photos ({held['n_subjects']} subjects: {', '.join(held['files'])}):")
        for group in ("all", "object", "live"):
            cells = summary_cells(held, group)
            if cells:
                print(f"  {group:<6} " + "  ".join(cells))


# ---------------------------------------------------------------------------------------------
# report

def _parse_result_arg(text: str):
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text.rstrip("/")).name, text
    if not name or not path:
        raise UserError(f"--results takes NAME=DIR (or DIR), got {text!r}")
    return name, path


def add_report_command(subparsers) -> None:
    p = subparsers.add_parser("report", help="compare several scored folders in one table, plot and page",
                              description="Read the scores.json of several `score` runs and write one "
                                          "comparison report (md, csv, json, png, html) to --output.")
    p.add_argument("--results", nargs="+", required=True, metavar="NAME=DIR",
                   help="method name and the --output folder of its `score` run (or its scores.json)")
    p.add_argument("--output", required=True, help="folder for the comparison report")
    p.add_argument("--reference", action="store_true", help="add the published reference numbers to report.md")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    from .report import load_results, write_report

    named = {}
    for text in args.results:
        name, path = _parse_result_arg(text)
        if name in named:
            raise UserError(f"method name {name!r} given twice in --results")
        named[name] = path
    results = {name: load_results(path) for name, path in named.items()}
    paths = write_report(results, args.output, reference=args.reference)
    for name, r in results.items():
        print(f"{name}:")
        _print_summary(r)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


# ---------------------------------------------------------------------------------------------
# bound

def add_bound_command(subparsers) -> None:
    p = subparsers.add_parser("bound", help="the real-image upper bound (distinct real-image pairs per subject)",
                              description="Mean cosine over pairs of distinct real images per subject, "
                                          "averaged over subjects, for every image metric.")
    p.add_argument("--dataset_dir", required=True, help="the DreamBooth dataset (<subject>/NN.jpg)")
    p.add_argument("--output", required=True, help="JSON file to write (a Markdown table goes beside it)")
    p.add_argument("--subjects", nargs="+", default=None, help="subjects (default: all 30)")
    add_encoder_arguments(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bound)


def run_bound(args) -> int:
    from .report import bound_markdown, write_bound
    from .score import real_image_bound

    encoders = encoders_from_args(args)
    bound = real_image_bound(args.dataset_dir, encoders, subjects=args.subjects, progress=not args.no_progress)
    path = write_bound(bound, args.output)
    print(bound_markdown(bound), end="")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


# ---------------------------------------------------------------------------------------------

def add_render_command(subparsers) -> None:
    from .render import add_render_command as add

    add(subparsers)


def add_curve_command(subparsers) -> None:
    from .curve import add_curve_command as add

    add(subparsers)


def add_table3_command(subparsers) -> None:
    from . import table3  # no torch at import: --help stays fast

    p = subparsers.add_parser("table3", help="train, render, score and compare the rows of the SingLoRA paper's "
                                             "Table 3 (and ablation rows)",
                              description=table3.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    table3.add_table3_arguments(p)
    p.set_defaults(func=table3.run_table3)


COMMANDS = [add_render_command, add_score_command, add_report_command, add_bound_command, add_curve_command,
            add_table3_command]


def build_parser() -> argparse.ArgumentParser:
    """The `dreambooth-singlora eval` (`python -m eval`) parser: one subparser per entry of COMMANDS."""
    # the spelling the user typed: `python -m eval` in a checkout, else the installed command
    prog = "python -m eval" if __package__ == "eval" else "dreambooth-singlora eval"
    parser = argparse.ArgumentParser(prog=prog,
                                     description="DreamBooth subject-fidelity evaluation (DINO, CLIP-I, CLIP-T).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(subparsers)
    return parser


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
