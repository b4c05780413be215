"""Findings of an outside read of the code, each with a test that failed before its fix: the resume key does not
rest on Python's hash(), plotting leaves the caller's matplotlib backend alone, the model card and the PNGs carry
what other tools read."""

import json
import os
import sys

import pytest

from dreambooth_singlora.train_dreambooth import batch_key


def test_the_batch_key_is_a_stable_function_equal_to_what_earlier_runs_drew():
    # the values CPython 3.8+ (64-bit) gives hash() of these tuples, masked: fixed here so that a Python whose
    # hash() differs (another version or implementation) still resumes a run exactly
    golden = {(0, 0, 0, 0): 41012001185518, (0, 1, 0, 0): 85650147141193, (7, 400, 3, 1): 14553305538632,
              (2**62, 5, 0, 0): 14359533116868, (-1, 2, 0, 0): 21434837237423}  # read off CPython 3.11's hash()
    for numbers, key in golden.items():
        assert batch_key(*numbers) == key
    if sys.implementation.name == "cpython" and sys.maxsize == 2**63 - 1:  # where it is the same as hash()
        for numbers in [*golden, (123456789, 399, 7, 15), (-12, 3, 0, 2)]:
            assert batch_key(*numbers) == hash(numbers) & 0x7FFF_FFFF_FFFF


def test_plotting_the_loss_leaves_the_callers_backend(tmp_path):
    import matplotlib

    from dreambooth_singlora.results import plot_loss

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's inline backend stands for any other than Agg
    try:
        plot_loss([[1, 0.5], [2, 0.4]], tmp_path / "loss.png", "dog")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)


@pytest.fixture(scope="module")
def trained(tiny_pipeline, dataset_dir, tmp_path_factory):
    from dreambooth_singlora.config import TrainConfig
    from dreambooth_singlora.train_dreambooth import train

    out = tmp_path_factory.mktemp("card")
    train(TrainConfig(pretrained_model_name_or_path=str(tiny_pipeline), subject="dog", dataset_dir=dataset_dir,
                      output_dir=str(out), resolution=32, max_train_steps=2, report_to="none", mixed_precision="no"))
    return out


def test_the_model_card_has_the_hubs_metadata(trained, tiny_pipeline):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained / "README.md")
    assert card.data.base_model == str(tiny_pipeline) and card.data.license == "creativeml-openrail-m"
    assert {"lora", "singlora", "dreambooth", "text-to-image"} <= set(card.data.tags)
    assert card.data.instance_prompt == "a photo of sks dog" and card.data.widget == [{"text": "a photo of sks dog"}]
    assert "Stable Diffusion 1.x" in card.text and "dreambooth-singlora generate --adapter" in card.text


def test_a_base_folders_own_licence_wins(tmp_path):
    from dreambooth_singlora.results import base_licence

    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a fine-tune\n")
    assert base_licence(str(tmp_path), "sdxl") == "apache-2.0"
    assert base_licence(str(tmp_path / "elsewhere"), "sdxl") == "openrail++"


def test_generated_pngs_carry_a1111_parameters(trained, tmp_path):
    from PIL import Image

    from dreambooth_singlora.generate import main

    main(["--adapter", str(trained), "--prompt", "a photo of sks dog", "--num_images_per_prompt", "1",
          "--num_inference_steps", "2", "--seed", "7", "--output_dir", str(tmp_path)])
    index = json.loads((tmp_path / "index.json").read_text())
    with Image.open(tmp_path / index["images"][0]["file"]) as im:
        text = im.text
    first, rest = text["parameters"].split("\n")
    assert first == "a photo of sks dog" and text["prompt"] == first and text["seed"] == "7"
    fields = dict(part.split(": ", 1) for part in rest.split(", "))
    assert fields["Steps"] == "2" and fields["Seed"] == "7" and fields["Sampler"] == "ddim"
    assert fields["CFG scale"] == "7.5" and fields["Size"] == "32x32" and fields["Lora"] == str(trained)


def test_held_out_photos_are_never_read_by_training(tiny_pipeline, dataset_dir, tmp_path, monkeypatch):
    """--holdout K: K photos chosen by the seed are recorded in the adapter's config and never opened (every
    PIL.Image.open of the run is watched); the same seed holds out the same photos."""
    from PIL import Image

    from dreambooth_singlora.config import TrainConfig
    from dreambooth_singlora.train_dreambooth import held_out, train

    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    out = tmp_path / "run"
    train(TrainConfig(pretrained_model_name_or_path=str(tiny_pipeline), subject="dog", dataset_dir=dataset_dir,
                      output_dir=str(out), resolution=32, max_train_steps=2, report_to="none", mixed_precision="no",
                      holdout=2, seed=3))
    meta = json.loads((out / "adapter_config.json").read_text())
    held = meta["holdout"]
    assert len(held) == 2 and held == held_out(f"{dataset_dir}/dog", 2, 3) == meta["run"]["holdout"]
    photos = [name for name, _ in meta["run"]["photos"]]
    assert not set(held) & set(photos) and len(photos) + 2 == len(os.listdir(f"{dataset_dir}/dog"))
    read = {p.rsplit("/", 1)[-1] for p in opened if "/dog/" in p}
    assert read == set(photos) and not read & set(held)
    assert held_out(f"{dataset_dir}/dog", 2, 4) != held or held_out(f"{dataset_dir}/dog", 2, 5) != held
