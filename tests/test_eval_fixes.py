"""Review fixes of the evaluation side: the scorer reads reference photos as training does (EXIF orientation,
transparency on white), and a report leaves the caller's matplotlib backend alone.

Encoders here are hand-made (features = pixels), so every expected number is exact arithmetic on known
pixels; PNG is lossless, so no tolerance beyond float32 rounding of a cosine (1e-6) is needed."""

import matplotlib
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dreambooth_singlora.data import to_rgb
from dreambooth_singlora.eval import encoders as E
from dreambooth_singlora.eval.report import write_report
from dreambooth_singlora.eval.score import score_folder
from dreambooth_singlora.prompts import get_subject, slugify

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
COS_TOL = 1e-6  # float32 cosine of identical 48- or 3-vectors


def pixel_encoder():
    """Features: the image at 4 x 4, flattened (position-sensitive: a rotated image scores below 1)."""
    return E.Encoder(name="pixels", transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]),
                     image_fn=lambda x: {"pix_i": x.flatten(1)}, image_metrics=("pix_i",), batch_size=4)


def mean_color_encoder():
    return E.Encoder(name="color", transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]),
                     image_fn=lambda x: {"color_i": x.mean(dim=(2, 3))}, image_metrics=("color_i",), batch_size=4)


def halves(left, right, size=(8, 4)):
    im = Image.new("RGB", size, left)
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return im


def generation(root, img, subject="dog"):
    d = root / subject / slugify(get_subject(subject).eval_prompts()[0])
    d.mkdir(parents=True)
    img.save(d / "0.png")


def score(images, dataset, encoder):
    r = score_folder(images, dataset, [encoder], subjects=["dog"], progress=False)
    return r["subjects"]["dog"][encoder.image_metrics[0]]


def test_exif_rotated_reference_scores_as_the_upright_photo(tmp_path):
    upright = halves(RED, BLUE)
    # stored turned a quarter (ROTATE_90), with EXIF orientation 6, which exif_transpose turns back
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, photo, kw in (("rotated", stored, dict(exif=exif.tobytes())), ("plain", upright, {})):
        (tmp_path / name / "dog").mkdir(parents=True)
        photo.save(tmp_path / name / "dog" / "00.png", **kw)
    assert to_rgb(Image.open(tmp_path / "rotated" / "dog" / "00.png")).tobytes() == upright.tobytes()
    generation(tmp_path / "images", upright)
    enc = pixel_encoder()
    as_upright = score(tmp_path / "images", tmp_path / "plain", enc)
    as_rotated = score(tmp_path / "images", tmp_path / "rotated", enc)
    assert as_upright == pytest.approx(1.0, abs=COS_TOL)
    assert as_rotated == pytest.approx(as_upright, abs=COS_TOL)
    # what the old reader (mode conversion only) saw: the stored pixels, a different picture
    raw = enc.encode_images([stored.convert("RGB")])["pix_i"]
    up = enc.encode_images([upright])["pix_i"]
    assert float(torch.nn.functional.cosine_similarity(raw, up)) < 0.9


def test_transparent_reference_is_composited_on_white(tmp_path):
    photo = Image.new("RGBA", (8, 8), (0, 0, 255, 0))  # fully transparent, blue underneath
    (tmp_path / "data" / "dog").mkdir(parents=True)
    photo.save(tmp_path / "data" / "dog" / "00.png")
    generation(tmp_path / "images", Image.new("RGB", (8, 8), WHITE))
    # on white: the reference is white, cosine 1; dropping alpha would leave blue: 1 / sqrt(3)
    assert score(tmp_path / "images", tmp_path / "data", mean_color_encoder()) == pytest.approx(1.0, abs=COS_TOL)


def test_report_leaves_the_callers_backend(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        (tmp_path / "data" / "dog").mkdir(parents=True)
        Image.new("RGB", (8, 8), RED).save(tmp_path / "data" / "dog" / "00.png")
        generation(tmp_path / "images", Image.new("RGB", (8, 8), RED))
        r = score_folder(tmp_path / "images", tmp_path / "data", [mean_color_encoder()], subjects=["dog"],
                         progress=False)
        paths = write_report({"m": r}, tmp_path / "report")
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
