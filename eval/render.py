"""`python -m eval render`: the benchmark's images for a folder of per-subject adapters.

    accelerate launch -m eval render --adapters runs/singlora --output images/singlora

<adapters>/<subject>/ holds each subject's adapter (what `train_dreambooth --subject S
--output_dir <adapters>/S` writes). For every subject: its 25 prompts x 4 images into
<output>/<subject>/<prompt-slug>/<k>.png, the layout `python -m eval score` reads. The base
pipeline is loaded once; SingLoRA, LoRA and LoRA+ adapters render through an adapter bank,
subjects mixed in each batch (`generate_many`), DoRA one subject at a time, merged. Subjects are split over the
processes accelerate launches; images already there are kept (resumable).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dreambooth_singlora.adapter import WEIGHTS_NAME, read_adapter
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.config import add_arguments, from_args
from dreambooth_singlora.generate import GenerateConfig, check_writable, load_pipeline
from dreambooth_singlora.multi import generate_many
from dreambooth_singlora.prompts import get_subject, subjects

logger = logging.getLogger("eval.render")


def find_adapters(adapters_dir, names=None) -> tuple[dict[str, Path], list[str]]:
    """({subject: adapter folder}, problems) for the subjects asked for (default: all 30)."""
    root = Path(adapters_dir)
    if not root.is_dir():
        raise UserError(f"adapters folder {root} does not exist (expected <adapters>/<subject>/{WEIGHTS_NAME})")
    wanted = list(names) if names else list(subjects())
    found, problems = {}, []
    for name in wanted:
        get_subject(name)  # unknown subject: one clear error
        if (root / name / WEIGHTS_NAME).is_file():
            found[name] = root / name
        else:
            problems.append(f"{name}: no adapter at {root / name / WEIGHTS_NAME}")
    return found, problems


def render(adapters_dir, output_dir, cfg: GenerateConfig, names=None, max_prompts: int | None = None) -> dict:
    """Render every found subject's prompts; returns {"rendered": [...], "skipped": [...]}."""
    from accelerate import PartialState

    state = PartialState()
    found, problems = find_adapters(adapters_dir, names)
    for p in problems:
        logger.warning("skipping %s", p)
    if not found:
        raise UserError(f"no subject adapter found in {adapters_dir}: " + "; ".join(problems[:3]))
    check_writable(output_dir)
    first = next(iter(found.values()))
    base = cfg.pretrained_model_name_or_path or read_adapter(first)[0].get("base_model")
    pipe = load_pipeline(None, base, device=state.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                         use_xformers=cfg.enable_xformers_memory_efficient_attention)
    with state.split_between_processes(sorted(found)) as mine:
        if mine:  # SingLoRA adapters of one rank render together, subjects mixed in each batch
            generate_many(pipe, {n: found[n] for n in mine}, cfg, output_dir,
                          prompts={n: get_subject(n).eval_prompts(cfg.identifier)[:max_prompts] for n in mine})
    state.wait_for_everyone()
    return {"rendered": list(mine), "skipped": problems}


def add_render_command(subparsers) -> None:
    p = subparsers.add_parser("render", help="render the 25 prompts x 4 images of every subject's adapter",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", required=True, help="folder of per-subject adapter folders")
    p.add_argument("--output", required=True, help="images folder (<output>/<subject>/<slug>/<k>.png)")
    p.add_argument("--subjects", nargs="+", default=None, help="subjects to render (default: all 30)")
    # every generation flag of `generate`, same names and defaults (GenerateConfig)
    add_arguments(p, GenerateConfig, exclude=("adapter", "prompt", "prompts_file", "subject", "output_dir",
                                              "skip_existing", "merge"))
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts per subject (demos)")
    p.add_argument("--no_resume", action="store_true", help="re-render images already in --output")
    p.set_defaults(func=run_render)


def run_render(args) -> int:
    args.adapter, args.output_dir, args.skip_existing = args.adapters, args.output, not args.no_resume
    cfg = from_args(GenerateConfig, args)
    if args.max_prompts is not None and args.max_prompts < 1:
        raise UserError(f"--max_prompts must be >= 1, got {args.max_prompts}")
    result = render(args.adapters, args.output, cfg, args.subjects, args.max_prompts)
    print(f"rendered {len(result['rendered'])} subjects into {args.output}; skipped {len(result['skipped'])}")
    return 0
