"""The evaluation suite: encoders (tiny random weights through the real loaders), folder scoring on
hand-made features, partial runs and bad input, and end-to-end `python -m eval` runs
(the checkout's name of dreambooth_singlora.eval)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dreambooth_singlora.errors import UserError
from dreambooth_singlora.prompts import get_subject, slugify, strip_identifier
from dreambooth_singlora.eval import encoders as E
from dreambooth_singlora.eval import metrics as M
from dreambooth_singlora.eval.cli import build_parser, main
from dreambooth_singlora.eval.report import write_report
from dreambooth_singlora.eval.score import ReferenceCache, real_image_bound, score_folder
from dreambooth_singlora.eval.testing import TINY_CLIP, TINY_DINO

ROOT = Path(__file__).resolve().parents[1]
S = 1 / math.sqrt(2)

# Tolerances, each from fp32 rounding (none from timing, threads or CPU: a test computes both sides
# in one process; these bound what a different order of the same float operations can change).
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
# Normalised input pixels, (x / 255 - mean) / std, |value| <= 2.7: the transform and the manual
# recomputation round in a different order, a few ulps of 2.7 each; 30 ulps of 2.7 ~ 1e-5.
PIXEL_TOL = 30 * 2.7 * EPS32


def unit_tol(d: int) -> float:
    """A unit fp32 vector of d components: its norm, and its cosine with a copy computed in another order,
    are off 1 by a sum of d rounding errors, ~sqrt(d) ulps; 8x margin."""
    return 8 * math.sqrt(d) * EPS32


def net_tol(depth: int, inner: int) -> float:
    """A unit feature after `depth` ViT blocks (4 matmuls each: qkv, proj, fc1, fc2; inner size <= `inner`)
    when the same forward runs in another order (batch size -> GEMM blocking): ~sqrt(inner) ulps per matmul.
    A wrong feature (another token, pooling, a pre-norm output, images mixed in a batch) is off by ~0.1."""
    return depth * 4 * math.sqrt(inner) * EPS32


# ---------------------------------------------------------------------------------------------
# fixtures: tiny checkpoints (saved once) and generation folders

@pytest.fixture(scope="session")
def ckpts(tiny_eval_checkpoints):
    return tiny_eval_checkpoints  # conftest.py: saved once per session


@pytest.fixture(scope="module")
def tiny_encoders(ckpts):
    """Tiny CLIP and DINO (with the patch-token diagnostic) loaded from files through the real loaders."""
    clip = E.load_encoder("clip", checkpoint=ckpts["clip_file"], device="cpu", model_kwargs=TINY_CLIP)
    dino = E.load_encoder("dino", checkpoint=ckpts["dino_file"], device="cpu", model_kwargs=TINY_DINO,
                          patch_tokens=True)
    return [clip, dino]


def real_image(dataset_dir, subject="dog", i=0, size=None):
    im = Image.open(Path(dataset_dir) / subject / f"{i:02d}.jpg").convert("RGB")
    return im.resize((size, size)) if size else im


def make_generations(root, dataset_dir, plan, n_images=4, size=64):
    """root/<subject>/<slug>/<k>.png for {subject: number of prompts}, from real images resized small."""
    for subject, n_prompts in plan.items():
        for p in get_subject(subject).eval_prompts()[:n_prompts]:
            d = Path(root) / subject / slugify(p)
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n_images):
                real_image(dataset_dir, subject, k % 4, size).save(d / f"{k}.png")
    return Path(root)


# ---------------------------------------------------------------------------------------------
# encoders

def test_registry():
    assert E.available_encoders()[:2] == ["clip", "dino"]
    with pytest.raises(UserError, match="unknown encoder 'dinov2'.*available: clip, dino"):
        E.load_encoder("dinov2")


def test_registry_accepts_injected_encoders():
    def factory(checkpoint=None, device=None):
        return E.image_encoder("toy", torch.nn.Flatten(), T.Compose([T.Resize((4, 4)), T.ToTensor()]), device="cpu")

    E.register_encoder("toy", factory)
    try:
        enc = E.load_encoder("toy")
        feats = enc.encode_images([Image.new("RGB", (8, 8), (255, 0, 0))])
        assert enc.metrics == ("toy",) and feats["toy"].shape == (1, 48)
    finally:
        E._REGISTRY.pop("toy")


def test_dino_transform_is_the_protocol():
    im = Image.linear_gradient("L").resize((512, 384)).convert("RGB")
    got = E.dino_transform()(im)
    # short side 384 -> 256 bicubic (512 -> 341), centre crop 224, ImageNet stats
    manual = im.resize((341, 256), Image.BICUBIC).crop((58, 16, 282, 240))
    mean = torch.tensor(E.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(E.IMAGENET_STD)[:, None, None]
    expected = (T.functional.pil_to_tensor(manual).float() / 255 - mean) / std
    assert got.shape == (3, 224, 224)
    assert torch.allclose(got, expected, atol=PIXEL_TOL)


def test_clip_transform_is_the_protocol():
    im = Image.linear_gradient("L").resize((300, 600)).convert("RGB")
    got = E.clip_transform()(im)
    manual = im.resize((224, 448), Image.BICUBIC).crop((0, 112, 224, 336))
    mean = torch.tensor(E.CLIP_MEAN)[:, None, None]
    std = torch.tensor(E.CLIP_STD)[:, None, None]
    assert torch.allclose(got, (T.functional.pil_to_tensor(manual).float() / 255 - mean) / std, atol=PIXEL_TOL)


def test_image_scored_against_itself_is_one(tiny_encoders, dataset_dir):
    images = [real_image(dataset_dir, "dog", 0), real_image(dataset_dir, "backpack", 1)]
    for enc in tiny_encoders:
        feats = enc.encode_images(images)
        again = enc.encode_images(images[::-1])
        for m in enc.image_metrics:
            f = feats[m]
            tol = unit_tol(f.shape[-1])
            assert f.dtype == torch.float32 and torch.allclose(f.norm(dim=-1), torch.ones(2), atol=tol)
            self_scores = M.image_scores(f[:1], again[m][1:])  # the same image, encoded separately
            assert self_scores.item() == pytest.approx(1.0, abs=tol), (enc.name, m)
    assert {m for e in tiny_encoders for m in e.metrics} == {"clip_i", "clip_t", "dino", "dino_patch"}


def test_real_dino_architecture_from_a_state_dict_file(tmp_path, dataset_dir):
    """The real ViT-S/16 (random weights) through the file path users take with the real weights."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "dino_vits16.safetensors"))
    enc = E.load_dino(checkpoint=tmp_path / "dino_vits16.safetensors", device="cpu")
    im = real_image(dataset_dir, "cat", 0)
    a, b = enc.encode_images([im])["dino"], enc.encode_images([im])["dino"]
    assert a.shape == (1, 384)
    assert M.cosine(a, b).item() == pytest.approx(1.0, abs=unit_tol(384))
    with torch.no_grad():  # the feature is the CLS token after the final norm, i.e. the pooled output
        ref = model.eval()(E.dino_transform()(im)[None])
    # ViT-S/16: 12 blocks, MLP inner size 4 x 384
    assert torch.allclose(a, torch.nn.functional.normalize(ref, dim=-1), atol=net_tol(12, 4 * 384))


def test_batching_does_not_change_features(ckpts, dataset_dir):
    images = [real_image(dataset_dir, "dog", i, 96) for i in range(3)]
    big = E.load_dino(ckpts["dino_dir"], device="cpu", batch_size=32)
    small = E.load_dino(ckpts["dino_dir"], device="cpu", batch_size=2)
    tol = net_tol(TINY_DINO["depth"], 4 * TINY_DINO["embed_dim"])  # the tiny DINO: 2 blocks, MLP 4 x 48
    assert torch.allclose(big.encode_images(images)["dino"], small.encode_images(images)["dino"], atol=tol)


def test_clip_tokenizer_77_tokens_keeps_end_token(tiny_encoders):
    tok = E.clip_tokenizer()
    short = tok(["a photo of sks dog"])
    assert short.shape == (1, 77)
    assert short[0, :8].tolist() == [49406, 320, 1125, 539, 48136, 1929, 49407, 0]
    long = tok(["a photo of a " + "very " * 100 + "happy dog"])
    assert long.shape == (1, 77)
    assert long[0, 0].item() == 49406 and long[0, -1].item() == 49407  # truncated, end token kept
    assert (long[0] != 0).all() and long[0].argmax().item() == 76      # CLIP pools at the end token
    clip = tiny_encoders[0]
    feats = clip.encode_texts(["a photo of a " + "very " * 100 + "happy dog", "a dog"])  # no error past 77
    assert feats.shape == (2, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=unit_tol(32))


@pytest.mark.filterwarnings("ignore:.*TorchScript archive")
def test_loader_errors_are_one_line(ckpts, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        E.load_clip(tmp_path / "nope.safetensors", device="cpu")
    with pytest.raises(UserError, match="no open_clip_config.json"):
        E.load_clip(tmp_path, device="cpu")
    with pytest.raises(UserError, match="no config.json"):
        E.load_dino(tmp_path, device="cpu")
    with pytest.raises(UserError, match="could not load DINO from .*dino.safetensors") as e:  # wrong architecture
        E.load_dino(ckpts["dino_file"], device="cpu", model_kwargs=dict(TINY_DINO, depth=1))
    assert "\n" not in str(e.value)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-32.pt"))  # like OpenAI's original file
    with pytest.raises(UserError, match="TorchScript archive"):
        E.load_clip(tmp_path / "ViT-B-32.pt", device="cpu", model_kwargs=TINY_CLIP)
    with pytest.raises(UserError, match="needs the dino encoder"):
        E.load_encoders(["clip"], dino_patch_tokens=True)


# ---------------------------------------------------------------------------------------------
# scoring on hand-made features: a colour encoder whose features are the mean RGB

def color_encoder(texts_seen=None):
    texts_seen = texts_seen if texts_seen is not None else []

    def text_fn(texts):
        texts_seen.extend(texts)
        return torch.tensor([[1.0, 0.0, 0.0]]).repeat(len(texts), 1)  # every prompt "is red"

    return E.Encoder(name="color", transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]),
                     image_fn=lambda x: {"color_i": x.mean(dim=(2, 3))}, image_metrics=("color_i",),
                     text_fn=text_fn, text_metric="color_t", text_pairs_with="color_i", batch_size=3)


RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def solid(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), rgb).save(path)


@pytest.fixture
def color_dataset(tmp_path):
    d = tmp_path / "dataset"
    solid(d / "dog" / "00.jpg", RED)
    solid(d / "dog" / "01.png", GREEN)
    solid(d / "backpack" / "00.png", RED)
    solid(d / "backpack" / "01.png", BLUE)
    solid(d / "backpack" / "02.png", RED)
    return d


def gen_dir(root, subject, prompt_index):
    return root / subject / slugify(get_subject(subject).eval_prompts()[prompt_index])


def test_known_vectors_give_known_scores(tmp_path, color_dataset):
    images = tmp_path / "images"
    solid(gen_dir(images, "dog", 0) / "0.png", RED)      # vs {red, green}: 1/2; text: 1
    solid(gen_dir(images, "dog", 0) / "1.png", YELLOW)   # (S + S) / 2 = S; text: S
    solid(gen_dir(images, "dog", 1) / "0.png", GREEN)    # 1/2; text: 0
    solid(gen_dir(images, "backpack", 0) / "0.png", RED)  # vs {red, blue, red}: 2/3; text: 1
    texts = []
    r = score_folder(images, color_dataset, [color_encoder(texts)], subjects=["dog", "backpack"], progress=False)

    by_path = {rec["path"]: rec for rec in r["images"]}
    dog0 = gen_dir(Path(""), "dog", 0).as_posix()
    assert by_path[f"{dog0}/0.png"]["color_i"] == pytest.approx(0.5)
    assert by_path[f"{dog0}/1.png"]["color_i"] == pytest.approx(S)
    assert by_path[f"{dog0}/1.png"]["color_t"] == pytest.approx(S)
    assert r["prompts"]["dog"]["a sks dog in the jungle"]["color_i"] == pytest.approx((0.5 + S) / 2)
    dog = (0.5 + S + 0.5) / 3
    assert r["subjects"]["dog"]["color_i"] == pytest.approx(dog)
    assert r["subjects"]["dog"]["color_t"] == pytest.approx((1 + S + 0) / 3)
    assert r["subjects"]["backpack"]["color_i"] == pytest.approx(2 / 3)
    assert r["summary"]["all"]["color_i"]["mean"] == pytest.approx((dog + 2 / 3) / 2)
    assert r["summary"]["all"]["color_i"]["std"] == pytest.approx(abs(dog - 2 / 3) / math.sqrt(2))
    assert r["summary"]["live"]["color_i"]["mean"] == pytest.approx(dog)         # dog is live
    assert r["summary"]["object"]["color_i"]["mean"] == pytest.approx(2 / 3)     # backpack is an object
    # real-image bound: dog {red, green} -> 0; backpack {red, blue, red}: pairs (r,b) 0, (r,r) 1 -> 2/6
    assert r["bound"]["subjects"]["dog"]["color_i"] == pytest.approx(0.0)
    assert r["bound"]["subjects"]["backpack"]["color_i"] == pytest.approx(1 / 3)
    assert r["bound"]["groups"]["all"]["color_i"]["mean"] == pytest.approx(1 / 6)
    assert r["scored"] == dict(images=4, subjects=2, prompts=3)
    # CLIP-T text: the prompt without the identifier
    assert sorted(texts) == sorted(["a dog in the jungle", "a dog in the snow", "a backpack in the jungle"])
    assert strip_identifier("a sks backpack in the jungle") == "a backpack in the jungle"


def test_with_identifier_flag(tmp_path, color_dataset):
    images = tmp_path / "images"
    solid(gen_dir(images, "dog", 0) / "0.png", RED)
    texts = []
    r = score_folder(images, color_dataset, [color_encoder(texts)], subjects=["dog"], with_identifier=True,
                     progress=False)
    assert texts == ["a sks dog in the jungle"]
    assert r["settings"]["protocol"]["with_identifier"] is True


def test_image_against_its_only_real_image_is_one_end_to_end(tmp_path, dataset_dir, tiny_encoders):
    data = tmp_path / "dataset"
    (data / "dog").mkdir(parents=True)
    real_image(dataset_dir, "dog", 0).save(data / "dog" / "00.jpg", quality=95)
    images = tmp_path / "images"
    d = gen_dir(images, "dog", 0)
    d.mkdir(parents=True)
    (d / "0.jpg").write_bytes((data / "dog" / "00.jpg").read_bytes())
    r = score_folder(images, data, tiny_encoders, subjects=["dog"], progress=False)
    tol = unit_tol(196 * TINY_DINO["embed_dim"])  # the longest feature: DINO patch tokens, 196 x 48
    for m in ("clip_i", "dino", "dino_patch"):
        assert r["summary"]["all"][m]["mean"] == pytest.approx(1.0, abs=tol)


def test_reference_features_cached_once_per_subject(tmp_path, color_dataset):
    calls = []
    enc = color_encoder()
    inner = enc.image_fn
    enc.image_fn = lambda x: calls.append(x.shape[0]) or inner(x)
    images = tmp_path / "images"
    for i in range(2):
        solid(gen_dir(images, "backpack", i) / "0.png", RED)
    cache = ReferenceCache(color_dataset)
    score_folder(images, color_dataset, [enc], subjects=["backpack"], cache=cache, progress=False)
    score_folder(images, color_dataset, [enc], subjects=["backpack"], cache=cache, progress=False)
    assert calls == [3, 2, 2]  # 3 real images once, then the 2 generations per run


def test_partial_run_lists_every_problem(tmp_path, color_dataset, caplog):
    images = tmp_path / "images"
    good = gen_dir(images, "dog", 0)
    for k in range(4):
        solid(good / f"{k}.png", RED)
    (good / "3.png").write_bytes(b"not a png")                      # unreadable image
    (good / "notes.txt").write_text("x")                             # stray file
    solid(images / "dog" / "a-dog-in-the-snow" / "0.png", RED)        # slug without the identifier
    solid(images / "dog" / "5.png", RED)                              # image outside a prompt folder
    solid(images / "dogg" / "a-sks-dog-in-the-jungle" / "0.png", RED)  # unknown subject
    (images / "settings.json").write_text(json.dumps({"steps": 50, "guidance_scale": 7.5}))
    caplog.set_level("WARNING")
    r = score_folder(images, color_dataset, [color_encoder()], subjects=["dog", "backpack"], progress=False)

    assert r["scored"] == dict(images=3, subjects=1, prompts=1)
    kinds = {}
    for p in r["skipped"]:
        kinds.setdefault(p["kind"], []).append(p)
    assert [p["path"] for p in kinds["missing_subject"]] == ["backpack/"]
    assert [p["path"] for p in kinds["unknown_subject"]] == ["dogg/"]
    assert "did you mean 'dog'" in kinds["unknown_subject"][0]["message"]
    assert [p["path"] for p in kinds["unknown_prompt"]] == ["dog/a-dog-in-the-snow/"]
    assert "did you mean 'a-sks-dog-in-the-snow'" in kinds["unknown_prompt"][0]["message"]
    assert [p["path"] for p in kinds["unreadable_image"]] == [f"{good.relative_to(images).as_posix()}/3.png"]
    assert [p["path"] for p in kinds["wrong_layout"]] == ["dog/5.png"]
    assert [p["path"] for p in kinds["ignored"]] == [f"{good.relative_to(images).as_posix()}/notes.txt"]
    assert len(kinds["missing_prompt"]) == 24
    assert r["settings"]["generation"] == {"settings.json": {"steps": 50, "guidance_scale": 7.5}}
    # one log line per problem, never a traceback
    warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == len(r["skipped"])
    assert all("\n" not in rec.getMessage() and not rec.exc_info for rec in warnings)

    paths = write_report({"partial": r}, tmp_path / "report")
    md = paths["md"].read_text()
    assert "unreadable_image: `dog/a-sks-dog-in-the-jungle/3.png`" in md
    assert "missing_subject: `backpack/`" in md and "steps=50" in md


def test_nothing_to_score_is_a_user_error(tmp_path, color_dataset):
    images = tmp_path / "images"
    solid(images / "0.png", RED)  # flat folder: wrong layout
    with pytest.raises(UserError, match="nothing scored .*wrong_layout: 0.png"):
        score_folder(images, color_dataset, [color_encoder()], progress=False)
    with pytest.raises(UserError, match="does not exist"):
        score_folder(tmp_path / "missing", color_dataset, [color_encoder()], progress=False)
    with pytest.raises(UserError, match="unknown subject 'dogs'"):
        score_folder(images, color_dataset, [color_encoder()], subjects=["dogs"], progress=False)


def test_bound_on_hand_made_features(color_dataset):
    b = real_image_bound(color_dataset, [color_encoder()], subjects=["dog", "backpack", "cat"], progress=False)
    assert b["subjects"]["dog"]["color_i"] == pytest.approx(0.0)
    assert b["subjects"]["backpack"]["color_i"] == pytest.approx(1 / 3)
    assert b["groups"]["all"]["color_i"]["mean"] == pytest.approx(1 / 6)
    assert b["groups"]["object"]["color_i"]["mean"] == pytest.approx(1 / 3)
    assert [p["kind"] for p in b["skipped"]] == ["no_real_images"]  # cat has no folder here


# ---------------------------------------------------------------------------------------------
# end to end: python -m eval score / report / bound with tiny checkpoints through the real loaders

def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_score_report_bound(tmp_path, dataset_dir, ckpts, capsys):
    images = make_generations(tmp_path / "images", dataset_dir, {"dog": 2, "backpack": 2})
    for subject in ("dog", "backpack"):  # what `generate` writes beside the prompt folders
        index = {"settings": {"num_inference_steps": 50, "guidance_scale": 7.5, "seed": 0}, "images": ["..."]}
        (images / subject / "index.json").write_text(json.dumps(index))
        real_image(dataset_dir, subject, 0, 32).save(images / subject / "contact_sheet.png")
    enc_args = ["--clip_checkpoint", str(ckpts["clip_dir"]), "--dino_checkpoint", str(ckpts["dino_dir"]),
                "--device", "cpu", "--no_progress"]
    out = tmp_path / "eval"
    assert main(["score", "--images", str(images), "--dataset_dir", dataset_dir, "--output", str(out),
                 "--subjects", "dog", "backpack", "--name", "tiny", *enc_args]) == 0
    printed = capsys.readouterr().out
    assert "scored 16 images (2 subjects, 4 prompts)" in printed

    r = json.loads((out / "scores.json").read_text())
    assert r["scored"] == dict(images=16, subjects=2, prompts=4)
    assert r["metrics"] == ["clip_i", "clip_t", "dino"]
    assert r["summary"]["all"]["dino"]["n_subjects"] == 2 and r["summary"]["all"]["dino"]["n_images"] == 16
    assert r["summary"]["live"]["clip_i"]["n_subjects"] == 1 and r["summary"]["object"]["clip_i"]["n_images"] == 8
    assert all(-1 <= rec[m] <= 1 for rec in r["images"] for m in r["metrics"])
    assert r["settings"]["generation"]["dog/index.json"]["settings"]["guidance_scale"] == 7.5
    assert set(r["settings"]["generation"]) == {"dog/index.json", "backpack/index.json"}
    assert r["settings"]["encoders"]["clip"]["quick_gelu"] is True
    assert r["settings"]["protocol"]["clip_t_text"] == "prompt without the identifier"
    assert len(r["real_images"]["dog"]) == 5 and len(r["real_images"]["backpack"]) == 6
    assert {p["kind"] for p in r["skipped"]} == {"missing_prompt"}  # 2 x 23 prompts not generated
    assert len(r["skipped"]) == 46

    assert len(_rows(out / "per_image.csv")) == 16
    assert len(_rows(out / "per_prompt.csv")) == 4
    assert [row["subject"] for row in _rows(out / "per_subject.csv")] == ["backpack", "dog"]
    summary = _rows(out / "report.csv")
    assert len(summary) == 3 * 3 + 3 * 2  # 3 groups x (3 metrics + 2 bound metrics)
    md = (out / "report.md").read_text()
    assert "| tiny |" in md and "| Real images (upper bound) |" in md
    assert md.count("num_inference_steps=50") == 1  # identical settings files shown once
    with Image.open(out / "report.png") as png:
        assert png.format == "PNG"
    page = (out / "report.html").read_text()
    srcs = [s.split('"')[0] for s in page.split('<img loading="lazy" src="')[1:]]
    assert len(srcs) == 16 + 11  # generations + real images of dog (5) and backpack (6)
    assert all((out / s).resolve().is_file() for s in srcs)  # relative paths that resolve

    # report: compare two methods (and one scored under another protocol choice)
    other = json.loads((out / "scores.json").read_text())
    other["settings"]["protocol"]["with_identifier"] = True
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scores.json").write_text(json.dumps(other))
    cmp_out = tmp_path / "cmp"
    assert main(["report", "--results", f"a={out}", f"b={out / 'scores.json'}", str(tmp_path / "other"),
                 "--output", str(cmp_out), "--reference"]) == 0
    md = (cmp_out / "report.md").read_text()
    assert "| a |" in md and "| b |" in md and "| other |" in md and "SingLoRA paper: DoRA r8" in md
    assert "not directly comparable" in md
    # one shared bound row per group table (3), plus the published one in the reference table
    assert md.count("| Real images (upper bound) |") == 3 + 1
    assert {row["method"] for row in _rows(cmp_out / "report.csv")} == {"a", "b", "other"}
    assert len(_rows(cmp_out / "per_image.csv")) == 48
    rep = json.loads((cmp_out / "report.json").read_text())
    assert set(rep["methods"]) == {"a", "b", "other"} and rep["comparable"] is False
    assert (cmp_out / "report.png").stat().st_size > 0 and (cmp_out / "report.html").is_file()

    # bound: the same real-image numbers as the score run's bound
    bound_file = tmp_path / "bound.json"
    assert main(["bound", "--dataset_dir", dataset_dir, "--output", str(bound_file),
                 "--subjects", "dog", "backpack", *enc_args]) == 0
    b = json.loads(bound_file.read_text())
    for m in ("dino", "clip_i"):
        # the same real images through the same encoders: means of cosines of <= 48-dim unit features
        assert b["groups"]["all"][m]["mean"] == pytest.approx(r["bound"]["groups"]["all"][m]["mean"],
                                                              abs=unit_tol(TINY_DINO["embed_dim"]))
    assert bound_file.with_suffix(".md").is_file()


def test_cli_bad_input_is_one_line(tmp_path, dataset_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", f"x={tmp_path}", "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no scores found at")

    (tmp_path / "scores.json").write_text(json.dumps({"format": "dreambooth-singlora-eval/1"}))
    with pytest.raises(SystemExit):
        main(["report", "--results", f"x={tmp_path}", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is incomplete" in err[0]
    with pytest.raises(SystemExit):
        main(["report", "--results", f"x={tmp_path}", f"x={tmp_path}", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method name 'x' given twice" in err[0]

    # a real subprocess: one line on stderr, exit 2, no traceback
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "eval", "score", "--images", str(tmp_path / "nope"),
                           "--dataset_dir", dataset_dir, "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "images folder" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr


def test_build_parser_can_take_another_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"score", "report", "bound"}
    args = parser.parse_args(["score", "--images", "i", "--dataset_dir", "d", "--output", "o"])
    assert args.encoders == ["clip", "dino"] and not args.with_identifier and not args.dino_patch_tokens
