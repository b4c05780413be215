"""eval.metrics: raw cosine, per-image scores, aggregation and the real-image bound on hand-made numbers."""

import math

import pytest
import torch

from dreambooth_singlora.eval import metrics as M

S = 1 / math.sqrt(2)

# Tolerances. Bare pytest.approx (rel 1e-6): float64 sums and means of a few hand-made numbers, exact to
# ~1e-15. Cosines are fp32: a cosine of d-component fp32 vectors rounds ~sqrt(d) times, so with d <= 3
# and an 8x margin it is within 8 * sqrt(3) * eps32 = 1.6e-6 of the exact value.
FP32_COS = 8 * math.sqrt(3) * torch.finfo(torch.float32).eps
# fp16 inputs: the result must be fp32, but normalising in the inputs' half precision first is allowed;
# that rounds S = 0.7071 to within one fp16 ulp at 0.7 (2**-11), and 2 ulps is the bound taken.
FP16_COS = 2 * 2 ** -11


@pytest.mark.parametrize("a, b, expected", [
    ([1.0, 0.0], [1.0, 0.0], 1.0),
    ([1.0, 0.0], [1.0, 1.0], S),
    ([3.0, 0.0], [0.0, 5.0], 0.0),            # unnormalised inputs are normalised
    ([1.0, 0.0], [-2.0, 0.0], -1.0),          # negative: no clamp at 0
    ([1.0, 2.0, 2.0], [2.0, 1.0, -2.0], 0.0),
    ([1.0, 2.0, 2.0], [1.0, 2.0, 0.0], 5 / (3 * math.sqrt(5))),
])
def test_cosine_is_raw(a, b, expected):
    got = M.cosine(torch.tensor([a]), torch.tensor([b]))
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, abs=FP32_COS)  # no x100, no logit scale


def test_cosine_matrix_and_fp32():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float16)
    got = M.cosine(a, a)
    assert got.dtype == torch.float32 and got.shape == (3, 3)
    assert torch.allclose(got.diagonal(), torch.ones(3), atol=FP32_COS)
    assert got[0, 1].item() == pytest.approx(0.0) and got[0, 2].item() == pytest.approx(S, abs=FP16_COS)


def test_image_scores_mean_over_real_images():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gen = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # red vs {red, green}: (1 + 0) / 2; yellow: (S + S) / 2; anti-red: (-1 + 0) / 2
    assert M.image_scores(gen, real).tolist() == pytest.approx([0.5, S, -0.5], abs=FP32_COS)


def test_image_scores_needs_real_images():
    with pytest.raises(ValueError):
        M.image_scores(torch.ones(1, 2), torch.empty(0, 2))


def test_text_scores_row_by_row():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert M.text_scores(images, texts).tolist() == pytest.approx([1.0, S], abs=FP32_COS)


def test_real_pair_mean_distinct_pairs_only():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs i != j: (0,1) 0, (0,2) S, (1,2) S, each counted both ways; the diagonal (1s) excluded
    assert M.real_pair_mean(real) == pytest.approx(2 * S / 3, abs=FP32_COS)
    assert M.real_pair_mean(torch.tensor([[1.0, 2.0], [2.0, 4.0]])) == pytest.approx(1.0)
    assert M.real_pair_mean(torch.tensor([[1.0, 0.0]])) is None


@pytest.mark.parametrize("values, mean, std", [
    ([1.0, 2.0, 3.0], 2.0, 1.0),              # sample std (n - 1)
    ([0.4, 0.1], 0.25, math.sqrt(0.045)),
    ([0.9], 0.9, None),
    ([], None, None),
])
def test_mean_std(values, mean, std):
    got_mean, got_std = M.mean_std(values)
    assert got_mean == (None if mean is None else pytest.approx(mean))
    assert got_std == (None if std is None else pytest.approx(std))


def _rec(subject, prompt, value):
    return dict(subject=subject, prompt=prompt, dino=value, clip_t=1 - value)


def test_aggregate_by_hand():
    records = [
        _rec("A", "p1", 0.2), _rec("A", "p1", 0.4), _rec("A", "p2", 0.6),   # object
        _rec("B", "p1", 0.8), _rec("B", "p1", 1.0),                          # live
        _rec("C", "p3", 0.1),                                                # object
    ]
    kinds = {"A": "object", "B": "live", "C": "object"}
    agg = M.aggregate(records, ["dino", "clip_t"], kinds)

    assert agg["prompts"]["A"]["p1"] == dict(n_images=2, dino=pytest.approx(0.3), clip_t=pytest.approx(0.7))
    assert agg["prompts"]["A"]["p2"]["dino"] == pytest.approx(0.6)
    # subject mean = mean of its images (0.2 + 0.4 + 0.6) / 3, not of its prompt means
    assert agg["subjects"]["A"] == dict(kind="object", n_images=3, n_prompts=2,
                                        dino=pytest.approx(0.4), clip_t=pytest.approx(0.6))
    assert agg["subjects"]["B"]["dino"] == pytest.approx(0.9)
    assert agg["subjects"]["C"]["dino"] == pytest.approx(0.1)

    g = agg["groups"]
    means = [0.4, 0.9, 0.1]
    mu = sum(means) / 3
    sd = math.sqrt(sum((m - mu) ** 2 for m in means) / 2)
    assert g["all"]["dino"] == dict(mean=pytest.approx(mu), std=pytest.approx(sd), n_subjects=3, n_images=6,
                                    image_mean=pytest.approx((0.2 + 0.4 + 0.6 + 0.8 + 1.0 + 0.1) / 6))
    assert g["object"]["dino"]["mean"] == pytest.approx(0.25)
    assert g["object"]["dino"]["std"] == pytest.approx(math.sqrt(0.045))
    assert g["object"]["dino"]["n_subjects"] == 2 and g["object"]["dino"]["n_images"] == 4
    assert g["live"]["dino"] == dict(mean=pytest.approx(0.9), std=None, n_subjects=1, n_images=2,
                                     image_mean=pytest.approx(0.9))
    assert g["all"]["clip_t"]["mean"] == pytest.approx(1 - mu)


def test_complete_run_overall_equals_image_mean():
    # equal image counts per subject (the protocol's 100): mean of subject means == mean of all images
    torch.manual_seed(0)
    values = torch.rand(3, 4).tolist()
    records = [_rec(s, f"p{i % 2}", v) for s, row in zip("ABC", values) for i, v in enumerate(row)]
    g = M.aggregate(records, ["dino"], {"A": "object", "B": "live", "C": "live"})["groups"]["all"]["dino"]
    assert g["mean"] == pytest.approx(g["image_mean"])
    assert g["mean"] == pytest.approx(sum(sum(r) for r in values) / 12)


def test_summarize_subjects_skips_missing_values_and_empty_groups():
    per_subject = {"A": dict(n_images=4, dino=0.5, clip_i=None), "B": dict(n_images=5, dino=0.7, clip_i=0.9)}
    g = M.summarize_subjects(per_subject, {"A": "object", "B": "object"}, ["dino", "clip_i"])
    assert g["all"]["dino"]["mean"] == pytest.approx(0.6)
    assert g["all"]["clip_i"] == dict(mean=pytest.approx(0.9), std=None, n_subjects=1, n_images=5,
                                      image_mean=pytest.approx(0.9))
    assert g["live"]["dino"] == dict(mean=None, std=None, n_subjects=0, n_images=0, image_mean=None)


def test_stratified_bootstrap():
    # one group: the plain bootstrap of its mean, drawn as paired_bootstrap draws (same generator, same
    # indices), so the two agree exactly
    v = torch.rand(9, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
    one = M.stratified_bootstrap([v], n_resamples=10_000)
    ref = M.paired_bootstrap(v, [0.0] * len(v))
    assert (one["low"], one["high"]) == (ref["low"], ref["high"]) and one["mean"] == pytest.approx(ref["mean"], abs=0)
    # constant groups (dyadic values): no spread, the interval is the mean of the group means exactly
    c = M.stratified_bootstrap([[0.25] * 4, [0.75] * 2])
    assert (c["mean"], c["low"], c["high"], c["n"], c["n_groups"]) == (0.5, 0.5, 0.5, 6, 2)
    # the mean of group means, not the pooled mean: (0 + 1) / 2, though 3 of the 4 values are 1
    assert M.stratified_bootstrap([[0.0], [1.0, 1.0, 1.0]])["mean"] == 0.5
    lone = M.stratified_bootstrap([[0.3], [0.7]])  # one value per group: the spread is unknown
    assert lone["low"] is None and lone["high"] is None
    assert M.stratified_bootstrap([])["mean"] is None
    r = M.stratified_bootstrap([v, [x + 1 for x in v]])
    assert r["low"] <= r["mean"] <= r["high"] and r == M.stratified_bootstrap([v, [x + 1 for x in v]])
