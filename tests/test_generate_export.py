"""Generation from a saved adapter and export to standard LoRA files, on the tiny pipeline."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from dreambooth_singlora import SingLoRAConfig, add_adapter, save_adapter, set_step
from dreambooth_singlora.export import export_lora
from dreambooth_singlora.export import main as export_main
from dreambooth_singlora.generate import GenerateConfig, generate_images, load_pipeline
from dreambooth_singlora.generate import main as generate_main
from dreambooth_singlora.testing import TINY_UNET_CONFIG


def make_adapter(tiny_pipeline, folder, method="singlora", unet=None, seed=0, **kw):
    """A saved adapter with random (non-zero) weights, mid-ramp, so every test can fail."""
    unet = unet or UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    add_adapter(unet, SingLoRAConfig(method=method, rank=4, alpha=6.0, ramp_steps=10, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    set_step(unet, 5)  # u = 0.5: the exported file must carry u
    save_adapter(unet, folder, base_model=str(tiny_pipeline))
    return unet


def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 48, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), e).sample


@pytest.mark.parametrize("method, fmt", [
    ("singlora", "kohya"), ("singlora", "diffusers"), ("lora", "kohya"), ("lora", "diffusers"),
    ("loraplus", "kohya"), ("dora", "diffusers")])
def test_export_loads_in_diffusers_with_same_output(method, fmt, tiny_pipeline, tmp_path):
    """Our adapter vs the exported file loaded by diffusers' own load_lora_weights: max abs diff < 1e-5 (fp32)."""
    ours = make_adapter(tiny_pipeline, tmp_path / "a", method)
    path = export_lora(tmp_path / "a", fmt, tmp_path / "lora.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(str(path))
    theirs, want = unet_out(pipe.unet), unet_out(ours)
    assert (want - base).abs().max() > 1e-2  # the adapter does something
    assert (theirs - want).abs().max() < 1e-5


def test_kohya_key_names_are_what_a1111_and_comfyui_read(tiny_pipeline, tmp_path):
    make_adapter(tiny_pipeline, tmp_path / "a")
    sd = load_file(str(export_lora(tmp_path / "a", "kohya", tmp_path / "k.safetensors")))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[f"{name}.lora_down.weight"].shape == (4, 48)  # (r, d_in): cross-attention key 48 -> 32
    assert sd[f"{name}.lora_up.weight"].shape == (32, 4)  # (d_out, r)
    assert sd[f"{name}.alpha"].item() == 6.0
    assert all(k.startswith("lora_unet_") for k in sd) and len(sd) == 28 * 3


def test_dora_kohya_export_refused_with_reason(tiny_pipeline, tmp_path, capsys):
    make_adapter(tiny_pipeline, tmp_path / "a", "dora")
    with pytest.raises(SystemExit) as e:
        export_main(["--adapter", str(tmp_path / "a"), "--format", "kohya", "--output", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "use --format diffusers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_dir(tiny_pipeline, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    make_adapter(tiny_pipeline, d)
    return d


def render(adapter_dir, out, merge, batch_size):
    cfg = GenerateConfig(adapter=str(adapter_dir), prompt=["a sks dog", "a sks dog on the beach"],
                         num_images_per_prompt=2, num_inference_steps=3, batch_size=batch_size, merge=merge,
                         output_dir=str(out), seed=7)
    pipe = load_pipeline(cfg.adapter, merge=cfg.merge, scheduler=cfg.scheduler)
    generate_images(pipe, cfg)
    return {p.relative_to(out).as_posix(): np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.rglob("*.png"))}


def test_same_seed_same_images_merged_or_not_any_batch(adapter_dir, tiny_pipeline, tmp_path):
    merged = render(adapter_dir, tmp_path / "m", merge=True, batch_size=4)
    unmerged = render(adapter_dir, tmp_path / "u", merge=False, batch_size=1)
    assert sorted(merged) == sorted(["a-sks-dog-on-the-beach/0.png", "a-sks-dog-on-the-beach/1.png",
                                     "a-sks-dog/0.png", "a-sks-dog/1.png"])
    for k in merged:  # merging changes fp32 rounding only: at most 1 level of 255
        assert np.abs(merged[k] - unmerged[k]).max() <= 1, k
    assert np.abs(merged["a-sks-dog/0.png"] - merged["a-sks-dog/1.png"]).max() > 0  # seeds differ
    base = GenerateConfig(pretrained_model_name_or_path=str(tiny_pipeline), prompt=["a sks dog"],
                          num_images_per_prompt=1, num_inference_steps=3, output_dir=str(tmp_path / "b"), seed=7)
    generate_images(load_pipeline(None, str(tiny_pipeline), scheduler="ddim"), base)
    plain = np.asarray(Image.open(tmp_path / "b" / "a-sks-dog" / "0.png"), dtype=np.int16)
    assert np.abs(plain - merged["a-sks-dog/0.png"]).max() > 0  # the adapter changes the image


def test_cli_writes_pngs_with_text_index_and_sheet(adapter_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    generate_main(["--adapter", str(adapter_dir), "--prompt", "a sks dog ../../../etc/passwd", "--prompt", "a sks dog",
                   "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--output_dir", str(out)])
    index = json.loads((out / "index.json").read_text())
    assert [i["file"] for i in index["images"]] == ["a-sks-dog-etc-passwd/0.png", "a-sks-dog-etc-passwd/1.png",
                                                    "a-sks-dog/0.png", "a-sks-dog/1.png"]
    assert index["settings"]["num_inference_steps"] == 2 and index["settings"]["scheduler"] == "ddim"
    im = Image.open(out / "a-sks-dog" / "1.png")
    assert im.text["prompt"] == "a sks dog" and im.text["seed"] == "1"
    assert json.loads(im.text["settings"])["guidance_scale"] == 7.5
    assert Image.open(out / "contact_sheet.png").size[0] > im.size[0]
    assert not list(tmp_path.glob("etc*")) and all(p.is_relative_to(out) for p in out.rglob("*"))


def test_a_prompt_given_twice_renders_into_two_folders_and_one_sheet(adapter_dir, tmp_path):
    """The same prompt twice gets two folders (plan) and two rows on the contact sheet (it had crashed there)."""
    out = tmp_path / "twice"
    generate_main(["--adapter", str(adapter_dir), "--prompt", "a sks dog", "--prompt", "a sks dog",
                   "--num_images_per_prompt", "1", "--num_inference_steps", "1", "--output_dir", str(out)])
    index = json.loads((out / "index.json").read_text())
    assert [i["file"] for i in index["images"]] == ["a-sks-dog/0.png", "a-sks-dog-2/0.png"]
    sheet, tile = Image.open(out / "contact_sheet.png"), Image.open(out / "a-sks-dog" / "0.png")
    assert sheet.size[1] > 2 * min(128, tile.size[1])  # two rows of (blown-up) thumbnails


def test_subject_prompts(adapter_dir, tmp_path):
    cfg = GenerateConfig(adapter=str(adapter_dir), subject="backpack", num_images_per_prompt=1)
    assert len(cfg.prompts()) == 25 and cfg.prompts()[0] == "a sks backpack in the jungle"


def test_long_prompt_warns_where_it_is_cut(adapter_dir, tmp_path, caplog):
    cfg = GenerateConfig(adapter=str(adapter_dir), prompt=["a sks dog " + "very " * 80 + "fluffy END"],
                         num_images_per_prompt=1, num_inference_steps=1, output_dir=str(tmp_path / "o"))
    with caplog.at_level(logging.WARNING):
        generate_images(load_pipeline(cfg.adapter), cfg)
    assert "over the 77-token limit" in caplog.text and "fluffy end" in caplog.text


def _other_arch_adapter(tiny_pipeline, folder):
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 32})
    make_adapter(tiny_pipeline, folder, unet=other)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("corrupt", "corrupt or truncated"),
    ("other_arch", "does not fit this UNet"),
    ("scheduler", "invalid choice"),
    ("unwritable", "cannot write to output folder"),
    ("no_prompt", "no prompt"),
])
def test_generate_bad_input_one_line(case, message, adapter_dir, tiny_pipeline, tmp_path, capsys):
    import shutil

    adapter, extra, out = str(adapter_dir), [], str(tmp_path / "o")
    if case == "missing":
        adapter = str(tmp_path / "nowhere")
    elif case == "corrupt":
        shutil.copytree(adapter_dir, tmp_path / "c")
        w = tmp_path / "c" / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:200])
        adapter = str(tmp_path / "c")
    elif case == "other_arch":
        _other_arch_adapter(tiny_pipeline, tmp_path / "x")
        adapter = str(tmp_path / "x")
    elif case == "scheduler":
        extra = ["--scheduler", "warp-drive"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "sub")
    prompt = [] if case == "no_prompt" else ["--prompt", "a sks dog"]
    with pytest.raises(SystemExit) as e:
        generate_main(["--adapter", adapter, *prompt, "--num_inference_steps", "1", "--output_dir", out, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_png_writer_writes_in_the_background_and_reports_a_failed_write(tmp_path):
    """Writes run on worker threads; leaving the block waits for them and re-raises the first error."""
    from dreambooth_singlora.generate import PngWriter

    from dreambooth_singlora.fileio import WriteError

    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(WriteError, match="a-file"):  # a UserError: one line for the CLI, naming the path
        with PngWriter(workers=2) as w:
            for k in range(5):  # one image object per write, as the pipeline returns them
                w.write(Image.new("RGB", (8, 8), (10, 200, k)), tmp_path / "ok" / f"{k}.png", "a sks dog", k, {})
            w.write(Image.new("RGB", (8, 8)), tmp_path / "a-file" / "0.png", "a sks dog", 0, {})  # folder is a file
    for k in range(5):
        with Image.open(tmp_path / "ok" / f"{k}.png") as im:
            assert im.text["seed"] == str(k) and im.getpixel((0, 0)) == (10, 200, k)
    assert not list((tmp_path / "ok").glob("*.tmp*"))


def test_batches_pad_the_last_batch_only_when_asked():
    from dreambooth_singlora.generate import batches

    jobs = list(range(7))
    assert list(batches(jobs, 3)) == [([0, 1, 2], 3), ([3, 4, 5], 3), ([6], 1)]
    assert list(batches(jobs, 3, pad=True)) == [([0, 1, 2], 3), ([3, 4, 5], 3), ([6, 6, 6], 1)]
    assert list(batches(jobs[:2], 3, pad=True)) == [([0, 1], 2)]  # one batch: nothing to match


def test_png_writer_keeps_the_blocks_own_error_and_survives_duplicate_targets(tmp_path, caplog, monkeypatch):
    import time

    from dreambooth_singlora import generate
    from dreambooth_singlora.errors import UserError
    from dreambooth_singlora.generate import PngWriter

    real = generate.write_png

    def slow_failing_write(*a):
        time.sleep(0.3)  # still running when the block raises
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate, "write_png", slow_failing_write)
    with pytest.raises(UserError, match="out of GPU memory"):  # not the write's OSError
        with PngWriter(workers=2) as w:
            w.write(Image.new("RGB", (8, 8)), tmp_path / "0.png", "p", 0, {})
            raise UserError("out of GPU memory rendering 48 images per batch: lower --batch_size")
    assert "writing a PNG failed too: [Errno 28] No space left on device" in caplog.text
    monkeypatch.setattr(generate, "write_png", real)
    with PngWriter(workers=4) as w:  # the same file from several threads: each has its own temporary file
        for k in range(40):
            w.write(Image.new("RGB", (8, 8), (k, 0, 0)), tmp_path / "same.png", "p", k, {})
    with Image.open(tmp_path / "same.png") as im:
        assert im.getpixel((0, 0))[0] == int(im.text["seed"])
    assert not list(tmp_path.glob("same.png.tmp*"))


def test_plan_never_puts_two_prompts_in_one_folder():
    from dreambooth_singlora.generate import plan

    slugs = [s for _, s, k in plan(["a sks dog", "a sks dog", "a sks dog 2", "a sks dog"], 1)]
    assert slugs == ["a-sks-dog", "a-sks-dog-2", "a-sks-dog-2-2", "a-sks-dog-3"]


def test_resume_keeps_its_own_images_and_renders_another_adapters_again(tiny_pipeline, tmp_path):
    """generate resumes by default: a second run keeps the images it made, but images of an adapter that was
    trained again under the same path (or of other settings) are rendered again, never kept as if current."""
    import shutil

    adapter = tmp_path / "adapter"
    make_adapter(tiny_pipeline, adapter)
    cfg = GenerateConfig(adapter=str(adapter), prompt=["a sks dog"], num_images_per_prompt=2, num_inference_steps=2,
                         output_dir=str(tmp_path / "out"), seed=3)
    pipe = load_pipeline(cfg.adapter, scheduler=cfg.scheduler)
    generate_images(pipe, cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "a-sks-dog").glob("*.png")}
    generate_images(pipe, cfg)  # nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "a-sks-dog").glob("*.png")} == stamps
    shutil.rmtree(adapter)
    make_adapter(tiny_pipeline, adapter, seed=5)  # trained again: other weights, same path
    generate_images(load_pipeline(cfg.adapter, scheduler=cfg.scheduler), cfg)
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "a-sks-dog").glob("*.png")}
    assert again.keys() == stamps.keys() and all(again[k] != stamps[k] for k in stamps)
