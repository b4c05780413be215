"""The benchmark's numbers, in plain torch / Python (no models here).

Similarity is the raw cosine of L2-normalised features: no x100, no logit scale, no clamp.
    DINO(g) / CLIP-I(g) = mean over the subject's real images r of cos(e(g), e(r))
    CLIP-T(g)           = cos(e_img(g), e_txt(prompt))
Aggregation: per (subject, prompt) the mean of its images; per subject the mean of its images;
per group (all / object / live) the mean of the subject means and their sample standard
deviation (n - 1). With the protocol's complete 30 x 25 x 4 run, the overall mean of subject
means equals the mean over all 3,000 images; `image_mean` records the latter too.
Real-image bound: per subject the mean cosine over ordered pairs of distinct real images
(i != j), then the same group aggregation over subjects.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

GROUPS = ("all", "object", "live")
STD_DDOF = 1


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) raw cosine similarities, computed in fp32."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return a @ b.T


def image_scores(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N, D) generated, (M, D) real -> (N,): each generation's mean cosine to the M real images."""
    if real.shape[0] == 0:
        raise ValueError("no real images to compare with")
    return cosine(generated, real).mean(dim=1)


def text_scores(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N, D) image features, (N, D) features of each image's prompt -> (N,) cosines, row by row."""
    assert images.shape == texts.shape, (images.shape, texts.shape)
    return (F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(dim=-1)


def real_pair_mean(real: torch.Tensor) -> Optional[float]:
    """(M, D) real-image features of one subject -> mean cosine over pairs i != j (None if M < 2)."""
    m = real.shape[0]
    if m < 2:
        return None
    sim = cosine(real, real)  # (M, M)
    return float((sim.sum() - sim.diagonal().sum()) / (m * (m - 1)))


def mean_std(values: Sequence[float], ddof: int = STD_DDOF) -> tuple:
    """(mean, standard deviation with `ddof`) of a list; None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n - ddof <= 0:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - ddof))


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def summarize_subjects(subject_values: Mapping[str, Mapping], kinds: Mapping[str, str],
                       metrics: Sequence[str]) -> dict:
    """Per-subject numbers -> {group: {metric: {mean, std, n_subjects, n_images, image_mean}}}.

    subject_values[s] holds a value per metric (None = not measured) and optionally 'n_images'
    (used for n_images and for image_mean, the image-weighted mean). kinds[s] is 'object'/'live'.
    """
    out = {}
    for group in GROUPS:
        members = [s for s in subject_values if group == "all" or kinds[s] == group]
        out[group] = {}
        for m in metrics:
            have = [s for s in members if subject_values[s].get(m) is not None]
            mean, std = mean_std([subject_values[s][m] for s in have])
            counts = [subject_values[s].get("n_images", 0) for s in have]
            total = sum(counts)
            image_mean = (math.fsum(subject_values[s][m] * c for s, c in zip(have, counts)) / total
                          if total else None)
            out[group][m] = dict(mean=mean, std=std, n_subjects=len(have), n_images=total, image_mean=image_mean)
    return out


def aggregate(records: Sequence[Mapping], metrics: Sequence[str], kinds: Mapping[str, str]) -> dict:
    """Per-image records -> the protocol's aggregates.

    records: dicts with 'subject', 'prompt' and one value per metric (one per generated image).
    Returns {'prompts': {subject: {prompt: {n_images, <metric>: mean}}},
             'subjects': {subject: {kind, n_images, n_prompts, <metric>: mean of its images}},
             'groups': summarize_subjects(...) over the subject means}.
    """
    by_prompt = defaultdict(lambda: defaultdict(list))
    by_subject = defaultdict(list)
    for r in records:
        by_prompt[r["subject"]][r["prompt"]].append(r)
        by_subject[r["subject"]].append(r)

    prompts = {s: {p: dict(n_images=len(rs), **{m: _mean(r[m] for r in rs) for m in metrics})
                   for p, rs in ps.items()} for s, ps in by_prompt.items()}
    subjects = {s: dict(kind=kinds[s], n_images=len(rs), n_prompts=len(by_prompt[s]),
                        **{m: _mean(r[m] for r in rs) for m in metrics}) for s, rs in by_subject.items()}
    return dict(prompts=prompts, subjects=subjects, groups=summarize_subjects(subjects, kinds, metrics))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean paired difference mean_i(a_i - b_i) and its percentile bootstrap interval over the units i.

    a, b: one value per unit (e.g. per subject: a method's mean over seeds and LoRA's mean over seeds), in
    the same order. The units are resampled with replacement `n_resamples` times (indices drawn by a
    torch.Generator seeded with `seed`, so the same inputs give the same interval on every run); each
    resample's mean difference is taken, and the interval is the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of those means (linear interpolation, float64). Equal inputs give
    exactly [0, 0]; a constant difference c gives [c, c] up to float64 rounding of a_i - b_i and the mean.
    With fewer than 2 units the spread is unknown: low and high are None.

    Returns {mean, low, high, n, n_resamples, confidence, seed}.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples}, {confidence}")
    n = len(a)
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    out = dict(mean=math.fsum(d.tolist()) / n if n else None, low=None, high=None, n=n,
               n_resamples=n_resamples, confidence=confidence, seed=seed)
    if n < 2:
        return out
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(n, (n_resamples, n), generator=g)].mean(dim=1)
    q = torch.quantile(means, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    out["low"], out["high"] = float(q[0]), float(q[1])
    return out


def stratified_bootstrap(groups: Sequence[Sequence[float]], *, n_resamples: int = 2_000, confidence: float = 0.95,
                         seed: int = 0) -> dict:
    """Mean of the group means and its percentile bootstrap interval, the values resampled within each group.

    groups: one list of values per group (e.g. per subject: one value per image). Each resample draws every
    group's values with replacement (its own size), takes each group's mean and then the mean over groups;
    the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means (float64,
    indices from a torch.Generator seeded with `seed`: the same inputs give the same interval). With one
    group this is the plain bootstrap of its mean; a group of identical values adds no spread. A group of
    one value cannot show its spread: low and high are None if every group has fewer than 2 values.

    Returns {mean, low, high, n (values), n_groups, n_resamples, confidence, seed}.
    """
    groups = [list(g) for g in groups if len(g)]
    n = sum(len(g) for g in groups)
    out = dict(mean=math.fsum(math.fsum(g) / len(g) for g in groups) / len(groups) if groups else None,
               low=None, high=None, n=n, n_groups=len(groups), n_resamples=n_resamples, confidence=confidence,
               seed=seed)
    if not groups or all(len(g) < 2 for g in groups):
        return out
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n_resamples, dtype=torch.float64)
    for g in groups:
        v = torch.tensor(g, dtype=torch.float64)
        total += v[torch.randint(len(g), (n_resamples, len(g)), generator=gen)].mean(dim=1)
    q = torch.quantile(total / len(groups),
                       torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    out["low"], out["high"] = float(q[0]), float(q[1])
    return out
