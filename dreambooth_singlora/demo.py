"""`dreambooth-singlora demo`: every command once, on a tiny random-weight model, in about a minute on a CPU.

    dreambooth-singlora demo                 # writes runs/demo/
    dreambooth-singlora demo --output /tmp/d --steps 10
    dreambooth-singlora demo --family sdxl   # the same on a tiny SDXL-shaped model (sd2: SD 2.x, v-prediction)

It needs no weights and no network: it builds a tiny Stable-Diffusion-shaped pipeline and tiny CLIP and
DINO encoders with RANDOM weights, then trains a SingLoRA adapter on three photos of the DreamBooth
subject `dog` that ship with the package, generates the subject's 25 evaluation prompts, exports a
kohya LoRA and scores the images. The images are noise and the scores mean nothing: the demo proves
that the install works, not the method. With Stable Diffusion 1.5 the same steps are the README's
quickstart (`--pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5`); with SDXL, its quickstart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import command_parser
from .errors import UserError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("demo", __doc__)
    p.add_argument("--output", "--output_dir", default="runs/demo", dest="output", help="the demo's folder")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--family", default="sd1", help="the tiny model's family: sd1 (Stable Diffusion 1.x), sd2 (2.x, "
                   "v-prediction) or sdxl (XL)")  # names, not base.FAMILIES: --help imports no torch
    return p


@cli_entry
def main(argv=None):
    from . import cli
    from .base import FAMILIES
    from .eval.testing import save_tiny_clip, save_tiny_dino
    from .fileio import check_writable
    from .prompts import prompts_dir
    from .testing import build_tiny

    args = build_parser().parse_args(argv)
    if args.family not in FAMILIES:
        raise UserError(f"unknown --family {args.family!r}: give one of {', '.join(FAMILIES)}")
    out = Path(args.output)
    check_writable(out)
    photos = prompts_dir() / "demo"
    print(f"demo in {out}: a tiny model with RANDOM weights - the images will be noise and the scores mean "
          "nothing; this checks the install, not the quality", flush=True)
    family = FAMILIES[args.family]
    model = out / ("tiny-sd" if family.name == "sd1" else f"tiny-{family.name}")
    if not (model / "model_index.json").is_file():
        build_tiny(family.name, model)
    clip, dino = out / "encoders" / "clip", out / "encoders" / "dino"
    if not (clip / "open_clip_config.json").is_file():
        save_tiny_clip(clip)
        save_tiny_dino(dino)
    dog = out / ("dog" if family.name == "sd1" else f"dog-{family.name}")  # one demo folder, every family's run
    steps = [
        ["train", "--pretrained_model_name_or_path", str(model), "--subject", "dog", "--dataset_dir", str(photos),
         "--output_dir", str(dog / "adapter"), "--resolution", "32", "--max_train_steps", str(args.steps),
         "--checkpointing_steps", str(args.steps), "--report_to", "none"],
        ["generate", "--adapter", str(dog / "adapter"), "--subject", "dog", "--num_images_per_prompt", "4",
         "--num_inference_steps", "4", "--height", "32", "--width", "32", "--batch_size", "50",
         "--output_dir", str(dog / "images" / "dog")],
        ["export", "--adapter", str(dog / "adapter"), "--output", str(dog / "dog_kohya.safetensors")],
        ["eval", "score", "--images", str(dog / "images"), "--dataset_dir", str(photos), "--output", str(dog / "eval"),
         "--subjects", "dog", "--clip_checkpoint", str(clip), "--dino_checkpoint", str(dino)],
    ]
    for argv_ in steps:
        print("\n$ dreambooth-singlora " + " ".join(argv_), flush=True)
        cli.main(argv_)  # a failed step raises SystemExit(2) (cli_entry), which ends the demo with it
    print(f"\ndemo done: adapter, 100 images (contact_sheet.png), a kohya LoRA and scores in {dog}. "
          f"For real images, run the same commands with --pretrained_model_name_or_path {family.example} "
          "(or a local copy of it) and the DreamBooth dataset.")


if __name__ == "__main__":
    main()
