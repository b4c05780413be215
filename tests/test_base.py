"""The base-model seam: the family is read from model_index.json before any weights load, an unsupported class is
refused in one line, and the trainer and the renderer import no model or pipeline class."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from dreambooth_singlora.base import Base, default_resolution, detect_family, torch_dtype
from dreambooth_singlora.errors import UserError

PACKAGE = Path(__file__).resolve().parent.parent / "dreambooth_singlora"


def copy_configs(tiny_pipeline, dest: Path) -> Path:
    """The pipeline's folder without a single weights file: detection must need nothing else."""
    shutil.copytree(tiny_pipeline, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def test_family_detected_from_configs_alone(tiny_pipeline, tmp_path):
    configs = copy_configs(tiny_pipeline, tmp_path / "configs")
    assert detect_family(str(configs)).name == "sd1"
    assert default_resolution(str(configs)) == 16 * 2  # the tiny UNet's sample size x its VAE's factor
    unet = configs / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "use_linear_projection": True}))
    assert detect_family(str(configs)).name == "sd2"  # SD 2.x's UNet projects attention linearly


@pytest.mark.parametrize("cls", ["FluxPipeline", "StableDiffusion3Pipeline", None])
def test_an_unsupported_pipeline_is_refused_in_one_line_naming_it(cls, tiny_pipeline, tmp_path):
    configs = copy_configs(tiny_pipeline, tmp_path / "m")
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
    with pytest.raises(UserError) as e:
        detect_family(str(configs))
    line = str(e.value)
    assert "\n" not in line and (cls or "unknown class") in line
    assert "StableDiffusionPipeline" in line and "StableDiffusionXLPipeline" in line


def test_an_sdxl_folder_without_its_second_text_encoder_is_named(tiny_pipeline, tmp_path):
    configs = copy_configs(tiny_pipeline, tmp_path / "xl")
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match="second text encoder.*text_encoder_2"):
        detect_family(str(configs))


def test_the_trainer_refuses_an_unsupported_base_before_reading_photos(tiny_pipeline, tmp_path, dataset_dir, capsys):
    from dreambooth_singlora.train_dreambooth import main

    configs = copy_configs(tiny_pipeline, tmp_path / "flux")
    (configs / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(SystemExit) as e:
        main(["--pretrained_model_name_or_path", str(configs), "--subject", "dog", "--dataset_dir", dataset_dir,
              "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "FluxPipeline" in err[-1] and "supported" in err[-1]


def test_base_encodes_prompts_into_unet_kwargs_and_says_the_target(tiny_pipeline):
    base = Base.load(str(tiny_pipeline), dtype="fp32")
    cond = base.encode_prompt("a photo of sks dog")
    assert list(cond) == ["encoder_hidden_states"] and cond["encoder_hidden_states"].shape == (1, 77, 48)
    assert base.unet_kwargs(cond) == cond and base.image_conditioning((64, 48), (0, 8), (32, 32)) == {}
    assert base.unet_kwargs({**cond, "text_embeds": 1, "time_ids": 2})["added_cond_kwargs"] == \
        {"text_embeds": 1, "time_ids": 2}  # SDXL's extra conditioning goes where its UNet reads it
    noise, latents, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert base.prediction_type == "epsilon" and torch.equal(base.target(latents, noise, t), noise)
    mean, std = base.latent_dist(torch.zeros(1, 3, 32, 32))
    assert mean.shape == std.shape == (1, 4, 16, 16)
    assert type(base.pipeline(scheduler="ddim")).__name__ == "StableDiffusionPipeline"
    base.free_encoders()
    with pytest.raises(UserError, match="freed"):
        base.pipeline()


def test_one_precision_vocabulary():
    assert torch_dtype("no") == torch_dtype("fp32") == torch.float32 and torch_dtype("bf16") == torch.bfloat16
    assert torch_dtype(None, "cpu") == torch.float32
    with pytest.raises(UserError, match="valid: no, fp32, fp16, bf16"):
        torch_dtype("fp8")
    from dreambooth_singlora.config import generate_parser, train_parser

    for parser, dest in ((train_parser(), "mixed_precision"), (generate_parser(), "dtype")):
        for flag in ("--mixed_precision", "--dtype"):  # both flag names, the same words, in every command
            assert getattr(parser.parse_args([flag, "fp32"]), dest) == "fp32"


#: modules that must not know a model family (they receive a Base)
FAMILY_FREE = ("train_dreambooth", "generate", "bank", "adapter", "processor", "checkpoint", "export", "config")
MODEL_CLASS = ("Pipeline", "UNet", "Autoencoder", "CLIP", "TextModel", "Tokenizer", "T5", "Transformer2D")


@pytest.mark.parametrize("module", FAMILY_FREE)
def test_only_the_base_module_imports_model_and_pipeline_classes(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported = [(node.module or "", a.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for a in node.names]
    imported += [(a.name, "") for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    bad = [f"{m}.{n}" for m, n in imported if m.split(".")[0] in ("diffusers", "transformers")
           and (any(word in n for word in MODEL_CLASS) or n in ("", "*") or ".pipelines" in m or ".models." in m
                and "attention_processor" not in m)]
    assert not bad, f"{module}.py imports {bad}: only base.py knows a model family"
    text = (PACKAGE / f"{module}.py").read_text()
    assert "getattr(diffusers" not in text and "StableDiffusion" not in text.replace("StableDiffusion 1", "")
