"""From what a person fills in to the CLI command a job runs: the UI's forms hold no training code, they build
the same command lines a shell would (`dreambooth-singlora train|generate|export|eval score ...`).

A run is a folder of the workspace:

    runs/<run>/run.json                     the form's settings and the subject
    runs/<run>/photos/<subject>/NN.png      the photos (uploads decoded, checked and re-encoded; or copied)
    runs/<run>/adapter/                     the trainer's --output_dir (adapter, README.md, validation/, checkpoints/)
    runs/<run>/images/<set>/<subject>/...   generate's output (<slug>/<k>.png, index.json, contact_sheet.png)
    runs/<run>/exports/<file>.safetensors   export's output
    runs/<run>/eval/<set>/                  eval score's report
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import uuid
from contextlib import suppress
from pathlib import Path

from ..config import METHODS, SCHEDULERS  # the trainer's methods; the samplers (SCHEDULERS' keys)
from ..errors import UserError, first_line
from ..fileio import write_json_atomic
from ..prompts import IDENTIFIER
from .jobs import cli
from .paths import check_name, existing_reference, inside, is_hub_id

MIN_PHOTOS, MAX_PHOTOS = 3, 20
MAX_PHOTO_BYTES = 25 * 2**20   # one upload; also Gradio's limit (app.launch_settings passes it as max_file_size)
MIN_PHOTO_SIDE = 64            # pixels: smaller is a thumbnail, not a training photo

#: GPU-memory presets: the trainer flags each sets. They rest on the defaults' 2.58 GB measured for one subject
#: at 512 px, batch 1 (README's speed table); prior preservation doubles the batch, so it is what needs headroom.
PRESETS = {
    "none": {},
    "8 GB": {"gradient_checkpointing": True, "train_batch_size": 1, "use_8bit_adam": True},
    "12 GB": {"gradient_checkpointing": True, "train_batch_size": 1, "use_8bit_adam": False},
    "24 GB": {"gradient_checkpointing": False, "train_batch_size": 2, "use_8bit_adam": False},
}
PRESET_NOTES = {
    "none": "the trainer's defaults (batch 1, no gradient checkpointing, AdamW)",
    "8 GB": "gradient checkpointing on, batch 1, 8-bit Adam on (needs bitsandbytes; left off where it is missing)",
    "12 GB": "gradient checkpointing on, batch 1, 8-bit Adam off",
    "24 GB": "gradient checkpointing off, batch 2, 8-bit Adam off",
}


def preset_flags(name: str) -> dict:
    """The flags of a preset; 8-bit Adam only where bitsandbytes is installed (the trainer would refuse it)."""
    if name not in PRESETS:
        raise UserError(f"unknown memory preset {name!r}; valid: {', '.join(PRESETS)}")
    flags = dict(PRESETS[name])
    if flags.get("use_8bit_adam") and importlib.util.find_spec("bitsandbytes") is None:
        flags["use_8bit_adam"] = False
    return flags


def family_of(model: str, base_config: str = "") -> str:
    """The base model's family ('sd1', 'sd2', 'sdxl'), or 'unknown (why)' when it cannot be told yet. A single
    .safetensors file is told by its `base_config` (a diffusers folder or hub id of the same family)."""
    model, base_config = str(model or "").strip(), str(base_config or "").strip()
    if not model:
        return "unknown (no base model given)"
    try:
        from ..base import detect_family
    except ImportError:
        return "unknown"
    try:
        fam = detect_family(model, base_config=base_config or None)
    except Exception as e:  # noqa: BLE001 - a family is a hint in the form, never an error
        return f"unknown ({first_line(e)})"
    return getattr(fam, "name", str(fam))


def instance_prompt(token: str, noun: str) -> str:
    token, noun = (token or "").strip(), (noun or "").strip()
    if not token or not noun or any(len(w.split()) != 1 for w in (token,)):
        raise UserError(f"give a rare token (one word, e.g. {IDENTIFIER}) and a class noun (e.g. dog)")
    return f"a photo of {token} {noun}"


def base_model(workspace, text: str, what: str = "base model") -> str:
    """A hub id as it is, else a local folder or single .safetensors file that must exist."""
    text = str(text or "").strip()
    if is_hub_id(text):
        return text
    return existing_reference(text, what, workspace)


# ---------------------------------------------------------------- photos
def upload_path(f) -> Path:
    """The path of an uploaded file: a path as it is, or the `.name` of a file object some Gradio versions hand."""
    return Path(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f))


def ingest_photos(files, dest: Path, staging_root: Path) -> list[Path]:
    """Decode and check each uploaded file as an image (dreambooth_singlora.data's reader), then write them as PNG
    into `dest` (a new folder). Refused: fewer than 3 or more than 20, a file over 25 MiB, one that is not an image,
    one smaller than 64 px. Nothing half-written is kept: the PNGs go to a staging folder, renamed into place whole."""
    from ..data import open_rgb

    files = [upload_path(f) for f in (files or [])]
    if not MIN_PHOTOS <= len(files) <= MAX_PHOTOS:
        raise UserError(f"{len(files)} photos given: upload {MIN_PHOTOS} to {MAX_PHOTOS} photos of the subject")
    images = []
    for f in files:
        if not f.is_file():
            raise UserError(f"upload {f.name} is missing; upload it again")
        if f.stat().st_size > MAX_PHOTO_BYTES:
            raise UserError(f"{f.name} is {f.stat().st_size / 2**20:.1f} MiB: photos up to "
                            f"{MAX_PHOTO_BYTES // 2**20} MiB are accepted")
        try:
            img = open_rgb(f)
        except UserError:
            raise UserError(f"{f.name} is not an image this tool can read: upload photos (JPEG, PNG, WebP, ...)"
                            ) from None
        if min(img.size) < MIN_PHOTO_SIDE:
            raise UserError(f"{f.name} is {img.size[0]}x{img.size[1]} px: photos need at least {MIN_PHOTO_SIDE} px "
                            "on the short side")
        images.append(img)
    if dest.exists():
        raise UserError(f"{dest} already exists: choose another run name")
    stage = staging_root / f"photos-{uuid.uuid4().hex}"
    try:
        stage.mkdir(parents=True)
        for i, img in enumerate(images):
            img.save(stage / f"{i:02d}.png", format="PNG")
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return sorted(dest.iterdir())


def copy_subject_photos(dataset_dir: str, subject: str, dest: Path, staging_root: Path) -> list[Path]:
    """A DreamBooth subject's photos from the dataset folder the person named, checked like uploads."""
    folder = Path(dataset_dir) / subject
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: the dataset folder holds one folder per subject "
                        f"(<dataset>/{subject}/*.jpg)")
    from ..data import list_images

    return ingest_photos(list_images(folder)[:MAX_PHOTOS], dest, staging_root)


# ---------------------------------------------------------------- runs
def run_dir(workspace, run: str) -> Path:
    return inside(workspace, f"runs/{check_name(run)}", "run")


def read_run(workspace, run: str) -> dict:
    path = run_dir(workspace, run) / "run.json"
    if not path.is_file():
        raise UserError(f"no run {run!r} in this workspace")
    return json.loads(path.read_text(encoding="utf-8"))


def new_train(workspace, form: dict) -> tuple[list, dict]:
    """Check the train form and lay out the run folder: (the command, the run's settings). The form's keys: run,
    subject ('' for uploaded photos), dataset_dir, photos (uploaded files), noun, token, base_model, base_config
    (for a single .safetensors file), method, rank,
    steps, learning_rate, prior, resolution, validation_prompt, preset, report_to, extra (flags a test adds)."""
    ws = Path(workspace).resolve()
    run = check_name(form.get("run") or "", "run name")
    rdir = run_dir(ws, run)
    # the run folder is claimed by one mkdir: of two Starts of one name (a double click) only one gets it, and
    # what is cleaned up on a refusal below is this call's own folder, never another's
    rdir.parent.mkdir(parents=True, exist_ok=True)
    try:
        rdir.mkdir()
    except FileExistsError:
        raise UserError(f"run {run!r} already exists: choose another name (or resume it from the Live run tab)"
                        ) from None
    try:
        return _lay_out_train(ws, rdir, run, form)
    except BaseException:
        shutil.rmtree(rdir, ignore_errors=True)
        raise


def _lay_out_train(ws: Path, rdir: Path, run: str, form: dict) -> tuple[list, dict]:
    """new_train's checks and layout inside the run folder it claimed (empty; removed by it if this raises)."""
    from ..prompts import get_subject

    subject = (form.get("subject") or "").strip()
    if subject:
        s = get_subject(subject)
        noun = (form.get("noun") or "").strip() or s.class_name
    else:
        noun = (form.get("noun") or "").strip()
    token = (form.get("token") or IDENTIFIER).strip()
    prompt = instance_prompt(token, noun)
    label = subject or check_name(noun.replace(" ", "_"), "class noun")
    method = form.get("method") or "singlora"
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    model = base_model(ws, form.get("base_model") or "")
    base_config = str(form.get("base_config") or "").strip()
    if model.endswith(".safetensors") and Path(model).is_file() and not base_config:
        raise UserError("a single .safetensors file needs a base config: a diffusers folder or hub id of the same "
                        "family (its configs, tokenizers and scheduler go with the file's weights)")
    if base_config:
        base_config = base_model(ws, base_config, "base config")
    numbers = {}
    for key, kind, lo in (("rank", int, 1), ("steps", int, 1), ("resolution", int, 8), ("learning_rate", float, 0)):
        if key == "resolution" and form.get(key) in (None, ""):  # empty: the base's own (512, 768 or 1024)
            numbers[key] = None
            continue
        try:
            numbers[key] = kind(form.get(key))
        except (TypeError, ValueError):
            raise UserError(f"{key} {form.get(key)!r} is not a number") from None
        if numbers[key] < lo or (key == "learning_rate" and numbers[key] <= 0):
            raise UserError(f"{key} must be at least {lo}" if key != "learning_rate" else "learning rate must be > 0")
    if numbers["resolution"] and numbers["resolution"] % 8:
        raise UserError(f"resolution {numbers['resolution']} is not a multiple of 8")
    validation = [p.strip() for p in (form.get("validation_prompt") or "").splitlines() if p.strip()]
    flags = preset_flags(form.get("preset") or "none")

    staging = ws / ".staging"
    photos_dir = rdir / "photos" / label
    if subject and not form.get("photos"):
        data = existing_reference(form.get("dataset_dir") or "", "dataset folder", ws)
        copy_subject_photos(data, subject, photos_dir, staging)
    else:
        ingest_photos(form.get("photos"), photos_dir, staging)
    adapter = rdir / "adapter"
    argv = cli("train", "--pretrained_model_name_or_path", model, "--instance_data_dir", photos_dir,
               "--instance_prompt", prompt, "--class_prompt", f"a photo of {noun}", "--identifier", token,
               "--output_dir", adapter, "--method", method, "--rank", numbers["rank"],
               "--max_train_steps", numbers["steps"], "--learning_rate", numbers["learning_rate"],
               "--report_to", form.get("report_to") or "tensorboard")
    if numbers["resolution"]:
        argv += ["--resolution", str(numbers["resolution"])]
    if base_config:
        argv += ["--base_config", base_config]
    if form.get("prior"):
        argv.append("--with_prior_preservation")
    if validation:
        every = max(1, min(100, numbers["steps"]))
        argv += ["--validation_prompt", *validation, "--validation_steps", str(every)]
    for key, value in flags.items():
        argv.append(f"--{key}" if value is True else f"--no-{key}" if value is False else f"--{key}")
        if not isinstance(value, bool):
            argv.append(str(value))
    argv += [str(a) for a in form.get("extra") or []]
    settings = {"run": run, "subject": subject, "label": label, "noun": noun, "token": token, "prompt": prompt,
                "base_model": model, "base_config": base_config, "method": method, **numbers,
                "prior": bool(form.get("prior")),
                "validation_prompt": "\n".join(validation), "preset": form.get("preset") or "none",
                "preset_flags": flags, "created": time.time(), "adapter": "adapter", "argv": argv}
    write_json_atomic(rdir / "run.json", settings)
    return argv, settings


def adapter_of(workspace, run: str) -> Path:
    adapter = run_dir(workspace, run) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"run {run!r} has no saved adapter yet: train it to the end first")
    return adapter


def new_generate(workspace, run: str, prompts: str, seed, n, scale, steps, guidance, scheduler,
                 eval_prompts: bool = False, size: int | None = None) -> tuple[list, Path]:
    """The generate command of a run's adapter: (command, its image folder). `eval_prompts`: the subject's 25
    DreamBooth evaluation prompts (what Evaluate scores) instead of the typed ones."""
    settings = read_run(workspace, run)
    adapter = adapter_of(workspace, run)
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown sampler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    try:
        seed, n, steps = int(seed), int(n), int(steps)
        scale, guidance = float(scale), float(guidance)
    except (TypeError, ValueError):
        raise UserError("seed, number of images and steps are whole numbers; strength and guidance numbers"
                        ) from None
    if not 1 <= n <= 64 or steps < 1:
        raise UserError("give 1 to 64 images per prompt and at least 1 step")
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{uuid.uuid4().hex[:4]}"
    out = run_dir(workspace, run) / "images" / stamp / settings["label"]
    argv = cli("generate", "--adapter", adapter, "--seed", seed, "--num_images_per_prompt", n,
               "--adapter_scale", scale, "--num_inference_steps", steps, "--guidance_scale", guidance,
               "--scheduler", scheduler, "--output_dir", out)
    if eval_prompts:
        if not settings.get("subject"):
            raise UserError("the evaluation prompts exist for the 30 DreamBooth subjects; this run used your "
                            "own photos: type prompts instead")
        argv += ["--subject", settings["subject"], "--identifier", settings["token"]]
    else:
        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if not lines:
            raise UserError("type at least one prompt (one a line), e.g. " + f"'{settings['prompt']} on a beach'")
        for p in lines:
            argv += ["--prompt", p]
    if size:
        argv += ["--height", size, "--width", size]
    return [str(a) for a in argv], out


def new_export(workspace, run: str, fmt: str) -> tuple[list, Path]:
    if fmt not in ("kohya", "diffusers"):
        raise UserError(f"unknown export format {fmt!r}; valid: kohya, diffusers")
    adapter = adapter_of(workspace, run)
    out = run_dir(workspace, run) / "exports" / f"{run}-{fmt}.safetensors"
    return cli("export", "--adapter", adapter, "--format", fmt, "--output", out), out


def image_sets(workspace, run: str) -> list[str]:
    """The run's generated image sets (images/<set>), newest first."""
    d = run_dir(workspace, run) / "images"
    return sorted((p.name for p in d.iterdir() if p.is_dir()), reverse=True) if d.is_dir() else []


def new_eval(workspace, run: str, image_set: str, clip: str, dino: str) -> tuple[list, Path]:
    """eval score of one image set of a run against the run's photos, with the encoders the person names."""
    ws = Path(workspace).resolve()
    settings = read_run(ws, run)
    if not settings.get("subject"):
        raise UserError("scoring follows the DreamBooth protocol, which knows the 30 DreamBooth subjects' prompts; "
                        "this run used your own photos")
    images = inside(run_dir(ws, run), f"images/{check_name(image_set or '', 'image set')}", "image set")
    if not (images / settings["subject"]).is_dir():
        raise UserError(f"image set {image_set} has no images of {settings['subject']}")
    clip_path = existing_reference(clip, "CLIP checkpoint", ws)
    dino_path = existing_reference(dino, "DINO checkpoint", ws)
    out = run_dir(ws, run) / "eval" / image_set
    argv = cli("eval", "score", "--images", images, "--dataset_dir", run_dir(ws, run) / "photos", "--output", out,
               "--subjects", settings["subject"], "--identifier", settings["token"], "--clip_checkpoint",
               clip_path, "--dino_checkpoint", dino_path, "--no_progress", "--name", f"{run}/{image_set}")
    return [str(a) for a in argv], out


def remove_partial(path: Path) -> None:
    with suppress(OSError):
        shutil.rmtree(path)
