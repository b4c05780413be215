"""Held-out photos (trainer --holdout, recorded in adapter_config.json): scoring reports CLIP-I / DINO against the
photos the adapter trained on, against the held-out ones, and their gap, in the score JSON, the printed summary
and the report; the holdout is read from --adapters or from the adapter each index.json names.

The colour encoder's features are mean RGB, so the expected cosines are exact: red against red 1, red against
green 0 (float32 rounding of a 3-vector cosine: 1e-6)."""

import json

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dreambooth_singlora.eval import encoders as E
from dreambooth_singlora.eval.cli import main as eval_main
from dreambooth_singlora.eval.holdout import holdouts_from_adapters
from dreambooth_singlora.eval.report import write_report
from dreambooth_singlora.eval.score import score_folder
from dreambooth_singlora.events import read_events
from dreambooth_singlora.prompts import get_subject, slugify

RED, GREEN = (255, 0, 0), (0, 255, 0)
TOL = 1e-6


def color_encoder():
    return E.Encoder(name="color", transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]),
                     image_fn=lambda x: {"color_i": x.mean(dim=(2, 3))}, image_metrics=("color_i",),
                     text_fn=lambda texts: torch.tensor([[1.0, 0.0, 0.0]]).repeat(len(texts), 1),
                     text_metric="color_t", text_pairs_with="color_i", batch_size=4)


def solid(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), rgb).save(path)


@pytest.fixture
def layout(tmp_path):
    """dog: photos 00 and 01 red (trained on), 02 green (held out); two red generations; the adapter folder
    records the holdout as the trainer does."""
    data, images, adapters = tmp_path / "data", tmp_path / "images", tmp_path / "adapters"
    for name, rgb in (("00.png", RED), ("01.png", RED), ("02.png", GREEN)):
        solid(data / "dog" / name, rgb)
    solid(data / "backpack" / "00.png", RED)
    for subject in ("dog", "backpack"):
        d = images / subject / slugify(get_subject(subject).eval_prompts()[0])
        for k in range(2):
            solid(d / f"{k}.png", RED)
    (adapters / "dog").mkdir(parents=True)
    (adapters / "dog" / "adapter_config.json").write_text(json.dumps({"holdout": ["02.png"],
                                                                       "run": {"subject": "dog"}}))
    (adapters / "backpack").mkdir()
    (adapters / "backpack" / "adapter_config.json").write_text(json.dumps({"run": {"subject": "backpack"}}))
    return data, images, adapters


def check(r):
    held = r["holdout"]
    assert held["files"] == {"dog": ["02.png"]} and held["n_subjects"] == 1  # backpack holds nothing out
    dog = held["subjects"]["dog"]
    assert dog["color_i_train"] == pytest.approx(1.0, abs=TOL)
    assert dog["color_i_heldout"] == pytest.approx(0.0, abs=TOL)
    assert dog["color_i_gap"] == pytest.approx(1.0, abs=TOL)
    assert r["subjects"]["dog"]["color_i"] == pytest.approx(2 / 3, abs=TOL)  # the protocol's: all photos
    assert held["summary"]["all"]["color_i_gap"]["mean"] == pytest.approx(1.0, abs=TOL)


def test_holdout_from_adapters_and_from_index(layout, tmp_path):
    data, images, adapters = layout
    assert holdouts_from_adapters([adapters]) == {"dog": ["02.png"], "backpack": []}
    assert holdouts_from_adapters([adapters / "dog"]) == {"dog": ["02.png"]}
    r = score_folder(images, data, [color_encoder()], subjects=["dog", "backpack"], progress=False,
                     holdout=holdouts_from_adapters([adapters]))
    check(r)
    # no flag: the adapter each subject's index.json names (what eval render / generate-many write)
    for s in ("dog", "backpack"):
        (images / s / "index.json").write_text(json.dumps({"settings": {"adapter": str(adapters / s)}}))
    r = score_folder(images, data, [color_encoder()], subjects=["dog", "backpack"], progress=False)
    check(r)
    md = write_report({"m": r}, tmp_path / "report")["md"].read_text()
    assert "## Held-out photos" in md and "| m | all | color_i | 1.000 | 0.000 | 1.000 | 1 |" in md
    assert "- m: dog: 02.png" in md
    assert "Held-out photos" in (tmp_path / "report" / "report.html").read_text()
    csv_text = (tmp_path / "report" / "report.csv").read_text()
    assert "m,holdout,all,color_i_gap,1.0" in csv_text


def test_holdout_naming_a_missing_photo_is_reported(layout):
    data, images, _ = layout
    r = score_folder(images, data, [color_encoder()], subjects=["dog"], progress=False,
                     holdout={"dog": ["02.png", "09.jpg"]})
    assert r["holdout"]["files"] == {"dog": ["02.png"]}
    assert [(p["kind"], p["path"]) for p in r["skipped"] if "holdout" in p["kind"]] == [("missing_holdout",
                                                                                       "dog/09.jpg")]
    everything = score_folder(images, data, [color_encoder()], subjects=["dog"], progress=False,
                              holdout={"dog": ["00.png", "01.png", "02.png"]})  # nothing left to train on
    assert everything["holdout"] is None and any(p["kind"] == "holdout_unusable" for p in everything["skipped"])


def test_cli_score_prints_the_holdout_and_reports_events(layout, tmp_path, tiny_eval_checkpoints, capsys):
    data, images, adapters = layout
    events = tmp_path / "ev.jsonl"
    assert eval_main(["score", "--images", str(images), "--dataset_dir", str(data), "--output", str(tmp_path / "out"),
                      "--subjects", "dog", "backpack", "--adapters", str(adapters), "--clip_checkpoint",
                      str(tiny_eval_checkpoints["clip_dir"]), "--dino_checkpoint",
                      str(tiny_eval_checkpoints["dino_dir"]), "--no_progress", "--events", str(events)]) == 0
    out = capsys.readouterr().out
    assert "held-out photos (1 subjects: dog):" in out and "DINO train" in out and "CLIP-I train" in out
    r = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(r["holdout"]["metrics"]) == {f"{m}_{s}" for m in ("clip_i", "dino") for s in ("train", "heldout", "gap")}
    ev = read_events(events)
    assert [e["event"] for e in ev][0] == "started" and ev[-1]["event"] == "finished"
    assert [e for e in ev if e["event"] == "progress"][-1] | {"time": 0} == {
        "event": "progress", "time": 0, "job": "score", "done": 4, "total": 4, "unit": "image"}
