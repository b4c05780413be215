"""Shared fixtures: tiny random-weight models built locally (no network, ever), and the test photos.

The expensive ones are session-scoped (built once per test run, shared by every test file):
    tiny_pipeline           folder of a tiny SD-1.5-shaped pipeline (diffusers layout)
    tiny_sd2_pipeline       folder of a tiny SD-2.1-shaped pipeline (v-prediction)
    tiny_sdxl_pipeline      folder of a tiny SDXL-shaped pipeline (two text encoders)
    tiny_eval_checkpoints   tiny random CLIP and DINO, saved as folders and as .safetensors files
    dataset_dir             the DreamBooth photos: $DREAMBOOTH_DATASET, else the excerpt in tests/data
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# the tiny models run fastest on one thread (and far faster than on two busy cores); inherited by the
# trainer / accelerate subprocesses the tests start
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
# The photos the tests use (dog, cat, backpack; 128 px), cut from the DreamBooth dataset (CC-BY-4.0,
# tests/data/dreambooth/README.md). DREAMBOOTH_DATASET points the tests at the full dataset instead.
TEST_DATASET = TESTS / "data" / "dreambooth"
DATASET = os.path.abspath(os.environ.get("DREAMBOOTH_DATASET") or TEST_DATASET)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Folder of a tiny SD-1.5-shaped pipeline in diffusers layout (built once per test session)."""
    from dreambooth_singlora.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd2_pipeline(tmp_path_factory):
    """Folder of a tiny SD-2.1-shaped pipeline (linear projections, v-prediction; built once per test session).
    Read-only for tests: copy before changing one."""
    from dreambooth_singlora.testing import build_tiny_sd2_pipeline

    return build_tiny_sd2_pipeline(tmp_path_factory.mktemp("tiny-sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory):
    """Folder of a tiny SDXL-shaped pipeline (two text encoders, text_time conditioning; built once per test
    session). Read-only for tests: copy before changing one."""
    from dreambooth_singlora.testing import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture
def tiny_unet(tiny_pipeline):
    """A fresh tiny UNet loaded from the saved pipeline through from_pretrained."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")


@pytest.fixture(scope="session")
def tiny_eval_checkpoints(tmp_path_factory):
    """Tiny random CLIP and DINO saved once per session, in both layouts the real loaders read:
    {"clip_dir", "dino_dir"} (open_clip / timm folders) and {"clip_file", "dino_file"} (.safetensors).
    Read-only for tests: copy before changing one."""
    from dreambooth_singlora.eval.testing import save_tiny_clip, save_tiny_dino

    d = tmp_path_factory.mktemp("encoders")
    return dict(clip_dir=save_tiny_clip(d / "clip"), dino_dir=save_tiny_dino(d / "dino"),
                clip_file=save_tiny_clip(d / "clip.safetensors"), dino_file=save_tiny_dino(d / "dino.safetensors"))


@pytest.fixture(scope="session")
def dataset_dir():
    """The DreamBooth photos as a str path: $DREAMBOOTH_DATASET if set (the full dataset), else the
    downscaled excerpt shipped in tests/data/dreambooth (subjects dog, cat, backpack)."""
    if not os.path.isdir(DATASET):
        pytest.fail(f"DreamBooth dataset not found at {DATASET} (DREAMBOOTH_DATASET="
                    f"{os.environ.get('DREAMBOOTH_DATASET')!r}); unset it to use {TEST_DATASET}")
    return DATASET
