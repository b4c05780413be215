"""`eval render`: the benchmark's images for a folder of per-subject adapters.

    python -m dreambooth_singlora.eval render --adapters runs/singlora --output images/singlora
    accelerate launch --num_processes 4 -m dreambooth_singlora.eval render --adapters runs/singlora --output ...

(`python -m eval render` from a checkout.) Messages go to the logger of dreambooth_singlora.generate,
which does the work, and the summary line to stdout.

<adapters>/<subject>/ holds each subject's adapter (what `train --subjects ... --output_dir <adapters>`
writes). For every subject: its 25 prompts x 4 images into <output>/<subject>/<prompt-slug>/<k>.png,
the layout `eval score` reads. This is generate-many's renderer (dreambooth_singlora.generate): the
base pipeline is loaded once, SingLoRA, LoRA and LoRA+ adapters render through an adapter bank,
subjects mixed in each batch, DoRA one subject at a time, merged. Subjects are split over the
processes accelerate launches; subjects without an adapter are skipped with a warning; images
already there are kept (resumable).
"""

from __future__ import annotations

import argparse


def add_render_command(subparsers) -> None:
    from dreambooth_singlora.config import add_many_arguments

    p = subparsers.add_parser("render", help="render the 25 prompts x 4 images of every subject's adapter",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_many_arguments(p, output_flag="--output")
    if "--events" not in p._option_string_actions:  # (the shared many-subject flags may come to hold it)
        p.add_argument("--events", default=None, metavar="FILE",
                       help="append the job's events to FILE as JSON lines (started, progress, finished or failed)")
    p.set_defaults(func=run_render)


def events_kwarg(fn, events) -> dict:
    """{"events": events} where the renderer function takes a stream (its `progress` events: one per batch of
    images), else {} (a renderer without one: the job still reports started and finished)."""
    import inspect

    return {"events": events} if "events" in inspect.signature(fn).parameters else {}


def run_render(args) -> int:
    from accelerate import PartialState

    from dreambooth_singlora.config import many_config
    from dreambooth_singlora.events import job
    from dreambooth_singlora.generate import render_subjects

    cfg = many_config(args)
    with job("render", args.events if PartialState().is_main_process else None) as events:  # one writer
        events.emit("started", config=dict(adapters=args.adapters, output=args.output_dir, subjects=args.subjects,
                                           max_prompts=args.max_prompts, settings=cfg.settings()))
        result = render_subjects(args.adapters, args.output_dir, cfg, args.subjects, args.max_prompts,
                                 skip_missing=True, **events_kwarg(render_subjects, events))
    print(f"rendered {len(result['rendered'])} subjects into {args.output_dir}; skipped {len(result['skipped'])}")
    return 0
