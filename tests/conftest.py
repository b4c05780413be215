"""Shared fixtures: tiny random-weight models built locally (no network, ever)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
torch.set_num_threads(1)  # the tiny models run fastest on one thread (and far faster than on two busy cores)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
DATASET = os.path.abspath(os.environ.get("DREAMBOOTH_DATASET", os.path.join(SHARED, "dreambooth", "dataset")))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Folder of a tiny SD-1.5-shaped pipeline in diffusers layout (built once per test session)."""
    from dreambooth_singlora.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def tiny_unet(tiny_pipeline):
    """A fresh tiny UNet loaded from the saved pipeline through from_pretrained."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")


@pytest.fixture(scope="session")
def dataset_dir():
    """The real DreamBooth dataset in ../shared (CI has it beside the clone)."""
    if not os.path.isdir(DATASET):
        pytest.fail(f"DreamBooth dataset not found at {DATASET}: put ../shared beside the project "
                    "or set DREAMBOOTH_DATASET")
    return DATASET
