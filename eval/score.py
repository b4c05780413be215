"""Score a folder of generations against the DreamBooth dataset.

Layout of a generations folder (what `render` writes):

    <images>/<subject>/<prompt-slug>/<k>.png      prompt-slug = slugify(prompt with identifier),
                                                  e.g. dog/a-sks-dog-in-the-jungle/0.png
    <images>/*.json, <images>/<subject>/*.json    generation settings (e.g. generate's index.json),
                                                  recorded as found; contact_sheet.png is skipped

Partial runs are scored as far as they go: every problem (a missing subject or prompt folder,
an unknown subject, a slug that matches no prompt, an unreadable image, a stray file) is one
line in the log and one entry in the result's 'skipped' list; nothing scored at all is an error.

    encoders = load_encoders(["clip", "dino"])
    result = score_folder("out/images", "dataset", encoders)      # -> JSON-ready dict
    write_report({"singlora": result}, "out/eval")                 # eval.report
"""

from __future__ import annotations

import datetime
import difflib
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from dreambooth_singlora import __version__
from dreambooth_singlora.data import IMAGE_SUFFIXES, open_rgb
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.prompts import IDENTIFIER, get_subject, slugify, strip_identifier
from dreambooth_singlora.prompts import subjects as all_subjects

from . import holdout as H
from . import metrics as M
from .encoders import Encoder, parallel_map

logger = logging.getLogger(__name__)

FORMAT = "dreambooth-singlora-eval/1"
IMAGES_PER_PROMPT = 4
LAYOUT = "<subject>/<prompt-slug>/<k>.png"
OVERVIEW_FILES = ("contact_sheet.png",)  # written by `generate` beside the prompt folders; not scored
_LOAD_CHUNK = 64  # generated images held in memory at once


@dataclass(frozen=True)
class Problem:
    """One thing that was skipped or looks wrong; `line()` is what the user reads."""

    kind: str      # missing_subject, unknown_subject, missing_prompt, unknown_prompt, unreadable_image, ...
    path: str      # relative to the folder it was found in (images or dataset)
    message: str

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.message}"


@dataclass(frozen=True)
class Generation:
    subject: str
    prompt: str    # with the identifier, as generated
    slug: str
    path: Path
    rel: str       # path relative to the images folder, '/'-separated


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _image_order(path: Path):
    return (0, int(path.stem), path.name) if path.stem.isdigit() else (1, 0, path.name)


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_image(path) -> Image.Image:
    """One image as training reads it (dreambooth_singlora.data.open_rgb: EXIF orientation applied,
    transparency composited on white, any mode to 8-bit RGB); UserError naming the file if unreadable."""
    return open_rgb(path)


_UNREADABLE = (UserError,)  # open_rgb turns every decoding failure into one


def _try_load(path):
    """load_image, or the exception that says why the file is unreadable."""
    try:
        return load_image(path)
    except _UNREADABLE as e:
        return e


def _problem(problems: list, kind: str, path: str, message: str) -> None:
    p = Problem(kind, path, message)
    problems.append(p)
    logger.warning("%s", p.line())


def _resolve_subjects(names: Optional[Sequence[str]]) -> list:
    if names is None:
        return list(all_subjects())
    return [get_subject(n).name for n in names]  # UserError for an unknown name


def scan_images(images_dir, *, identifier: str = IDENTIFIER, expected_subjects: Optional[Sequence[str]] = None,
                max_prompts: Optional[int] = None):
    """Walk a generations folder: (generations, problems, settings JSON found at its top level). With
    max_prompts, only each subject's first max_prompts prompts are expected (the others are not reported
    missing; found, they are scored)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise UserError(f"images folder {str(images_dir)!r} does not exist or is not a folder (expected {LAYOUT})")
    expected = _resolve_subjects(expected_subjects)
    known = all_subjects()
    items, problems, settings, seen = [], [], {}, set()
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_file():
            _stray_file(entry, name, "image at the top level", "not a subject folder", settings, problems)
            continue
        if name not in known:
            _problem(problems, "unknown_subject", f"{name}/",
                     f"not one of the {len(known)} DreamBooth subjects{_suggest(name, known)}")
            continue
        if name not in expected:
            _problem(problems, "not_requested", f"{name}/", "subject not in the requested subjects")
            continue
        seen.add(name)
        items += _scan_subject(entry, known[name], identifier, problems, settings, max_prompts)
    for name in expected:
        if name not in seen:
            _problem(problems, "missing_subject", f"{name}/", "no folder: subject not scored")
    return items, problems, settings


def _stray_file(entry: Path, rel: str, misplaced: str, ignored: str, settings: dict, problems: list) -> None:
    """A file where folders are expected: JSON is recorded as settings, overview sheets skipped,
    images reported as misplaced, anything else as ignored."""
    if entry.suffix.lower() == ".json":
        _read_settings(entry, rel, settings, problems)
    elif entry.name in OVERVIEW_FILES:
        return
    elif _is_image(entry):
        _problem(problems, "wrong_layout", rel, f"{misplaced}; expected {LAYOUT}")
    else:
        _problem(problems, "ignored", rel, ignored)


def _read_settings(path: Path, rel: str, settings: dict, problems: list) -> None:
    try:
        settings[rel] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        _problem(problems, "bad_settings", rel, f"not readable JSON ({e}); not recorded")


def _scan_subject(folder: Path, subject, identifier: str, problems: list, settings: dict,
                  max_prompts: Optional[int] = None) -> list:
    by_slug = {slugify(p): p for p in subject.eval_prompts(identifier)}
    items, found = [], set()
    for entry in sorted(folder.iterdir()):
        rel = f"{subject.name}/{entry.name}"
        if entry.name.startswith("."):
            continue
        if entry.is_file():  # e.g. generate's per-subject index.json and contact sheet
            _stray_file(entry, rel, "image directly in the subject folder", "not a prompt folder", settings, problems)
            continue
        if entry.name not in by_slug:
            _problem(problems, "unknown_prompt", f"{rel}/",
                     f"slug matches no prompt of {subject.name!r} with identifier {identifier!r}"
                     f"{_suggest(entry.name, by_slug)}")
            continue
        found.add(entry.name)
        images = []
        for f in sorted(entry.iterdir(), key=_image_order):
            if f.name.startswith("."):
                continue
            if _is_image(f):
                images.append(f)
            else:
                _problem(problems, "ignored", f"{rel}/{f.name}", "not an image file")
        if not images:
            _problem(problems, "empty_prompt", f"{rel}/", "no images: prompt not scored")
        elif len(images) != IMAGES_PER_PROMPT:
            _problem(problems, "image_count", f"{rel}/",
                     f"{len(images)} images (protocol: {IMAGES_PER_PROMPT}); all scored")
        items += [Generation(subject.name, by_slug[entry.name], entry.name, f, f"{rel}/{f.name}") for f in images]
    for slug in list(by_slug)[:max_prompts]:
        if slug not in found:
            _problem(problems, "missing_prompt", f"{subject.name}/{slug}/", "no folder: prompt not scored")
    return items


def check_folders(images_dir, dataset_dir) -> None:
    """UserError unless both folders exist (cheap; run it before loading encoders)."""
    if not Path(images_dir).is_dir():
        raise UserError(f"images folder {str(images_dir)!r} does not exist or is not a folder (expected {LAYOUT})")
    _check_dataset(dataset_dir)


def real_image_paths(dataset_dir, subject: str) -> list:
    """The subject's real images in the DreamBooth dataset (dataset/<subject>/*.jpg), sorted."""
    folder = Path(dataset_dir) / subject
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image(p) and not p.name.startswith(".")), key=_image_order)


def _check_dataset(dataset_dir) -> Path:
    root = Path(dataset_dir)
    if not root.is_dir():
        raise UserError(f"dataset folder {str(dataset_dir)!r} does not exist (expected the DreamBooth "
                        "dataset: <dataset>/<subject>/NN.jpg)")
    return root


class ReferenceCache:
    """Real-image features, computed once per (encoder, subject) and reused across folders."""

    def __init__(self, dataset_dir):
        self.dataset_dir = _check_dataset(dataset_dir)
        self._features = {}   # (id(encoder), subject) -> {metric: (M, D)}
        self._encoders = {}   # id -> encoder, keeps ids valid while cached
        self._images = {}     # subject -> (relative paths, PIL images, problems)

    def _load(self, subject: str):
        if subject not in self._images:
            paths, images, problems = [], [], []
            for p in real_image_paths(self.dataset_dir, subject):
                try:
                    images.append(load_image(p))
                    paths.append(p.relative_to(self.dataset_dir).as_posix())
                except _UNREADABLE as e:
                    _problem(problems, "unreadable_real_image", p.relative_to(self.dataset_dir).as_posix(),
                             str(e))
            if not images:
                _problem(problems, "no_real_images", f"{subject}/",
                         f"no readable real images in {self.dataset_dir / subject}: subject not scored")
            self._images[subject] = (paths, images, problems)
        return self._images[subject]

    def paths(self, subject: str) -> list:
        return self._load(subject)[0]

    def problems(self, subject: str) -> list:
        return self._load(subject)[2]

    def features(self, encoder: Encoder, subject: str) -> Optional[dict]:
        """{metric: (M, D)} for the subject's real images, None if it has none readable."""
        key = (id(encoder), subject)
        if key not in self._features:
            _, images, _ = self._load(subject)
            self._encoders[id(encoder)] = encoder
            self._features[key] = encoder.encode_images(images) if images else None
        return self._features[key]

    def release_images(self) -> None:
        """Drop the decoded real images (features stay cached)."""
        self._images = {s: (paths, [], probs) for s, (paths, _, probs) in self._images.items()}


def _metric_names(encoders: Sequence[Encoder]) -> list:
    names = [m for e in encoders for m in e.metrics]
    if len(set(names)) != len(names):
        raise UserError(f"two encoders produce the same metric: {names}")
    return names


def protocol_settings(*, with_identifier: bool, identifier: str, encoders: Sequence[Encoder]) -> dict:
    """The protocol choices behind a set of numbers (recorded with them)."""
    return dict(
        similarity="raw cosine of L2-normalised fp32 features (no x100, no logit scale, no clamp)",
        image_metrics="mean cosine to each of the subject's real images",
        clip_t_text="prompt with the identifier" if with_identifier else "prompt without the identifier",
        with_identifier=with_identifier,
        identifier=identifier,
        aggregation="per prompt: mean of its images; per subject: mean of its images; "
                    "per group: mean of subject means",
        std=f"sample standard deviation (ddof={M.STD_DDOF}) across subject means",
        real_bound="per subject: mean cosine over pairs of distinct real images; then mean over subjects",
        dino_patch_tokens=any("dino_patch" in e.image_metrics for e in encoders),
        images_per_prompt=IMAGES_PER_PROMPT,
    )


def score_folder(images_dir, dataset_dir, encoders: Sequence[Encoder], *, with_identifier: bool = False,
                 identifier: str = IDENTIFIER, subjects: Optional[Sequence[str]] = None,
                 cache: Optional[ReferenceCache] = None, progress: bool = True, holdout: Optional[dict] = None,
                 events=None, max_prompts: Optional[int] = None) -> dict:
    """Score every generation under images_dir against the real images; returns a JSON-ready dict.

    Keys: metrics, summary ({all, object, live} -> metric -> mean/std/n_subjects/n_images),
    subjects, prompts, bound (real-image bound of the scored subjects), images (one record per
    scored image), real_images, scored (counts), skipped (problems), settings (encoders,
    protocol, generation JSON found in images_dir), images_dir, dataset_dir, holdout (None, or the
    scores against the photos each subject's adapter trained on and against its held-out ones: eval.holdout).
    holdout: {subject: held-out photo names} (default: read from the adapters the images' index.json files
    name). events: a dreambooth_singlora.events.Events that gets a `progress` event per chunk of images.
    max_prompts: only each subject's first max_prompts prompts are expected (scan_images).
    Raises UserError when nothing could be scored.
    """
    metrics = _metric_names(encoders)
    cache = cache or ReferenceCache(dataset_dir)
    items, problems, gen_settings = scan_images(images_dir, identifier=identifier, expected_subjects=subjects,
                                                max_prompts=max_prompts)
    if holdout is None:
        holdout = H.holdouts_from_settings(gen_settings)
    image_metrics = [m for e in encoders for m in e.image_metrics]
    held_files, held_metrics = {}, H.metric_names(image_metrics)
    by_subject = defaultdict(list)
    for g in items:
        by_subject[g.subject].append(g)

    records, real_images, bound_subjects, kinds = [], {}, {}, {}
    text_encoders = [e for e in encoders if e.text_fn is not None]
    bar = tqdm(total=len(items), desc="scoring", unit="img", disable=not progress)
    done = 0
    for subject, gens in by_subject.items():
        kinds[subject] = get_subject(subject).kind
        refs = {id(e): cache.features(e, subject) for e in encoders}
        problems += cache.problems(subject)
        if any(r is None for r in refs.values()):
            bar.update(len(gens))
            done += len(gens)
            continue
        real_images[subject] = cache.paths(subject)
        n_real = len(real_images[subject])
        split = _holdout_split(subject, holdout.get(subject) or [], real_images[subject], problems)
        if split:
            held_files[subject] = [Path(real_images[subject][i]).name for i in split[1]]
        bound_subjects[subject] = dict(kind=kinds[subject], n_images=n_real, **{
            m: M.real_pair_mean(refs[id(e)][m]) for e in encoders for m in e.image_metrics})

        prompts = sorted({g.prompt for g in gens})
        texts = [p if with_identifier else strip_identifier(p, identifier) for p in prompts]
        text_feats = {id(e): dict(zip(prompts, e.encode_texts(texts))) for e in text_encoders}

        for start in range(0, len(gens), _LOAD_CHUNK):
            chunk, images = [], []
            part = gens[start:start + _LOAD_CHUNK]
            for g, im in zip(part, parallel_map(_try_load, [g.path for g in part])):
                if isinstance(im, Exception):
                    _problem(problems, "unreadable_image", g.rel, f"{im}; not scored")
                else:
                    images.append(im)
                    chunk.append(g)
            scores = {}
            if chunk:
                for e in encoders:
                    feats = e.encode_images(images)
                    for m in e.image_metrics:
                        scores[m] = M.image_scores(feats[m], refs[id(e)][m]).tolist()
                        for side, idx in zip(("train", "heldout"), split or ()):
                            scores[f"{m}_{side}"] = M.image_scores(feats[m], refs[id(e)][m][idx]).tolist()
                        if split:
                            scores[f"{m}_gap"] = [a - b for a, b in zip(scores[f"{m}_train"], scores[f"{m}_heldout"])]
                    if e.text_fn is not None:
                        txt = torch.stack([text_feats[id(e)][g.prompt] for g in chunk])
                        scores[e.text_metric] = M.text_scores(feats[e.text_pairs_with], txt).tolist()
            names = metrics + (held_metrics if split else [])
            for i, g in enumerate(chunk):
                records.append(dict(subject=g.subject, kind=kinds[subject], prompt=g.prompt, slug=g.slug,
                                    path=g.rel, **{m: scores[m][i] for m in names}))
            bar.update(len(gens[start:start + _LOAD_CHUNK]))
            done += len(part)
            if events is not None:
                events.emit("progress", done=done, total=len(items), unit="image")
    bar.close()

    if not records:
        lines = [p.line() for p in problems if p.kind not in ("missing_subject", "missing_prompt")]
        first = f"; first problem: {lines[0]}" if lines else ""
        raise UserError(f"nothing scored in {str(images_dir)!r}: expected {LAYOUT} with prompt slugs like "
                        f"'a-{identifier}-dog-in-the-jungle'{first}")

    agg = M.aggregate(records, metrics, kinds)
    bound_metrics = [m for e in encoders for m in e.image_metrics]
    images_root = Path(images_dir).resolve()
    n_prompts = sum(len(ps) for ps in agg["prompts"].values())
    logger.info("scored %d images (%d subjects, %d prompts) in %s; %d problems", len(records),
                len(agg["subjects"]), n_prompts, images_root, len(problems))
    return dict(
        format=FORMAT,
        version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        images_dir=str(images_root),
        dataset_dir=str(cache.dataset_dir.resolve()),
        metrics=metrics,
        summary=agg["groups"],
        subjects=agg["subjects"],
        prompts=agg["prompts"],
        bound=dict(metrics=bound_metrics, subjects=bound_subjects,
                   groups=M.summarize_subjects(bound_subjects, kinds, bound_metrics)),
        scored=dict(images=len(records), subjects=len(agg["subjects"]), prompts=n_prompts),
        skipped=[asdict(p) for p in problems],
        settings=dict(encoders={e.name: e.settings for e in encoders},
                      protocol=protocol_settings(with_identifier=with_identifier, identifier=identifier,
                                                 encoders=encoders),
                      generation=gen_settings),
        real_images=real_images,
        images=records,
        holdout=_holdout_section(records, held_files, image_metrics, held_metrics, kinds),
    )


def _holdout_split(subject: str, names: list, real_paths: list, problems: list):
    """(training indices, held-out indices) of the subject's real photos, or None (no holdout, or one that
    leaves no photo on either side: reported as a problem)."""
    if not names:
        return None
    train_idx, held_idx, missing = H.split(real_paths, names)
    for name in missing:
        _problem(problems, "missing_holdout", f"{subject}/{name}",
                 "held-out photo named by the adapter is not in the dataset folder; left out")
    if not train_idx or not held_idx:
        _problem(problems, "holdout_unusable", f"{subject}/",
                 f"{len(train_idx)} training and {len(held_idx)} held-out photos found: no held-out scores")
        return None
    return train_idx, held_idx


def _holdout_section(records, held_files: dict, image_metrics, held_metrics, kinds) -> Optional[dict]:
    """The scores against training and held-out photos of the subjects with a holdout (None if none has)."""
    recs = [r for r in records if r["subject"] in held_files]
    if not recs:
        return None
    agg = M.aggregate(recs, held_metrics, {s: kinds[s] for s in held_files})
    return dict(image_metrics=image_metrics, metrics=held_metrics, files=held_files, n_subjects=len(agg["subjects"]),
                subjects=agg["subjects"], summary=agg["groups"],
                note="<metric>_train: mean cosine to the photos the adapter trained on; _heldout: to the photos it "
                     "never saw; _gap: train - heldout. The protocol's <metric> uses all photos.")


def real_image_bound(dataset_dir, encoders: Sequence[Encoder], *, subjects: Optional[Sequence[str]] = None,
                     cache: Optional[ReferenceCache] = None, progress: bool = True) -> dict:
    """The real-image upper bound: per subject the mean cosine over distinct real-image pairs."""
    cache = cache or ReferenceCache(dataset_dir)
    names = _resolve_subjects(subjects)
    metrics = [m for e in encoders for m in e.image_metrics]
    per_subject, kinds, problems = {}, {}, []
    for subject in tqdm(names, desc="real images", unit="subject", disable=not progress):
        feats = {id(e): cache.features(e, subject) for e in encoders}
        problems += cache.problems(subject)
        if any(f is None for f in feats.values()):
            continue
        kinds[subject] = get_subject(subject).kind
        per_subject[subject] = dict(kind=kinds[subject], n_images=len(cache.paths(subject)), **{
            m: M.real_pair_mean(feats[id(e)][m]) for e in encoders for m in e.image_metrics})
    if not per_subject:
        raise UserError(f"no subject of the DreamBooth dataset found in {str(dataset_dir)!r} "
                        "(expected <dataset>/<subject>/NN.jpg)")
    return dict(
        format=FORMAT, version=__version__, dataset_dir=str(cache.dataset_dir.resolve()), metrics=metrics,
        subjects=per_subject, groups=M.summarize_subjects(per_subject, kinds, metrics),
        skipped=[asdict(p) for p in problems],
        settings=dict(encoders={e.name: e.settings for e in encoders},
                      protocol=dict(real_bound="per subject: mean cosine over pairs of distinct real images "
                                               "(i != j); then mean over subjects",
                                    std=f"sample standard deviation (ddof={M.STD_DDOF}) across subjects")),
    )
