"""SD 2.x (v-prediction) and SDXL end to end on the tiny pipelines: every command (train, a SIGKILL and resume,
several subjects in one batch, generate, export and diffusers' own loader, eval score; on SDXL also the PEFT
baselines and prior preservation), what follows each family
(SDXL's time ids, SD2's v target, the adapter's and model card's family, an adapter refused on the other family's
base, the default resolution), and single-file checkpoints with --base_config.

Tolerances. The trained runs are float64 (torch's default dtype during the fixture; the trainer's "no" precision
runs in it): several subjects in one batch equal one at a time, and a run from a single file its folder's run, to
FP64_TOL of the largest weight, derived in tests/test_multi.py (the same sums in another order, a few float64 ulps
carried by Adam over a few steps). A resumed run equals the uninterrupted one exactly: the same code on the same
numbers.
"""

import json
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dreambooth_singlora.train_dreambooth as T
from dreambooth_singlora import load_adapter, merge_adapter
from dreambooth_singlora.base import FAMILIES, Base, default_resolution, detect_family
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.prompts import get_subject
from helpers import killed_run
from original_layout import same_weights, write_single_file
from test_base import copy_configs
from test_families import ALL_TARGETS, check_kohya_file_fused_by_diffusers
from test_multi import FP64_TOL, float64, rel_diff, weights

STEPS = 4
SUBJECTS = ("dog", "cat")
PIPELINE = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def flags(src, dataset_dir, **extra) -> list[str]:
    """The trainer's flags of every run here: small, lr high enough that 4 steps move the adapter well past
    rounding, u = 1 from step 2 (ramp_steps 2), every projection adapted (what the kohya check covers)."""
    kw = dict(pretrained_model_name_or_path=src, dataset_dir=dataset_dir, resolution=32, max_train_steps=STEPS,
              rank=4, report_to="none", mixed_precision="no", checkpointing_steps=2, log_every=2, ramp_steps=2,
              learning_rate=1e-2, **extra)
    out = [a for k, v in kw.items() for a in (f"--{k}", str(v))]
    return out + ["--random_flip", "--target_modules", *ALL_TARGETS]


@pytest.fixture(scope="module")
def pipelines(tiny_sd2_pipeline, tiny_sdxl_pipeline):
    return {"sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}


@pytest.fixture(scope="module")
def runs(pipelines, dataset_dir, tmp_path_factory):
    """runs(family): in float64, one run per subject (dog with a validation image) and one run of both subjects in
    one batch, same flags and seed; the loss targets the trainer asked the base for are recorded. Each family is
    trained once per module, when a test first asks for it."""
    done = {}

    def get(family: str) -> SimpleNamespace:
        if family in done:
            return done[family]
        root, src = tmp_path_factory.mktemp(f"runs-{family}"), str(pipelines[family])
        targets, real = [], Base.target

        def spy(self, latents, noise, t):  # what group_losses asked for, checked against the scheduler's own
            out = real(self, latents, noise, t)
            v = self.noise_scheduler.get_velocity(latents, noise, t)
            targets.append((self.prediction_type, torch.equal(out, v), torch.equal(out, noise)))
            return out

        with float64(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(Base, "target", spy)
            T.main([*flags(src, dataset_dir), "--subject", "dog", "--output_dir", str(root / "single" / "dog"),
                    "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1",
                    "--validation_steps", str(STEPS)])
            T.main([*flags(src, dataset_dir), "--subject", "cat", "--output_dir", str(root / "single" / "cat")])
            T.main([*flags(src, dataset_dir), "--subjects", *SUBJECTS, "--output_dir", str(root / "multi")])
        done[family] = SimpleNamespace(family=family, src=src, root=root, dog=root / "single" / "dog",
                                       targets=targets)
        return done[family]

    return get


# --------------------------------------------------------------------------- train

@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_train_names_the_family_in_adapter_and_card(family, runs):
    r = runs(family)
    meta = json.loads((r.dog / "adapter_config.json").read_text())
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    assert (meta["family"], meta["prediction_type"], meta["step"], meta["rank"]) == (family, prediction, STEPS, 4)
    assert FAMILIES[family].label in (r.dog / "README.md").read_text()  # "Stable Diffusion 2.x" / "... XL"
    assert (r.dog / "validation" / f"step-{STEPS:05d}" / "0.png").is_file()  # the family's pipeline, mid-run
    stats = json.loads((r.dog / "train_stats.json").read_text())
    assert [h[0] for h in stats["loss_history"]] == [2, 4]


def test_sd2_trains_on_the_v_target_and_sdxl_on_epsilon(runs):
    """Every loss of the SD 2.x runs compared the UNet with v = alpha_t eps - sigma_t x0 (the scheduler's
    get_velocity), not with the noise; SDXL's with the noise."""
    v, eps = runs("sd2").targets, runs("sdxl").targets
    assert len(v) >= 3 * STEPS and all(t == ("v_prediction", True, False) for t in v)
    assert len(eps) >= 3 * STEPS and all(t == ("epsilon", False, True) for t in eps)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_several_subjects_in_one_batch_equal_one_at_a_time(family, runs):
    r = runs(family)
    for s in SUBJECTS:
        a, b = weights(r.root / "single" / s), weights(r.root / "multi" / s)
        assert next(iter(a.values())).dtype == torch.float64 and rel_diff(a, b) < FP64_TOL
        first = weights(r.root / "single" / s / "checkpoints" / "checkpoint-2")
        assert rel_diff(a, first) > 1e6 * FP64_TOL  # it trained on: the comparison is not of two unmoved adapters
        assert json.loads((r.root / "multi" / s / "adapter_config.json").read_text())["family"] == family
    assert rel_diff(weights(r.root / "multi" / "dog"), weights(r.root / "multi" / "cat")) > 1e-4


def test_sdxl_run_killed_mid_step_resumes_to_the_uninterrupted_adapter(pipelines, dataset_dir, tmp_path):
    """SIGKILL in the middle of step 3 (after the forward, before the update) and the same command with
    --resume_from_checkpoint latest: exactly the adapter of the uninterrupted run (float32, as the killed child)."""
    argv = lambda out: [*flags(str(pipelines["sdxl"]), dataset_dir), "--subject", "dog", "--output_dir", str(out)]
    assert killed_run(argv(tmp_path / "killed"), 3, tmp_path) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    T.main([*argv(tmp_path / "killed"), "--resume_from_checkpoint", "latest"])
    assert json.loads((tmp_path / "killed" / "train_stats.json").read_text())["steps_run"] == STEPS - 2
    T.main(argv(tmp_path / "ref"))
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_time_ids_follow_the_crop(pipelines):
    """LatentCache.sample's conditioning of a non-square photo (h 48, w 80): original size (48, 80), crop top-left
    = the prepared crop's offset (resized to 32 x 53, cut to 32 x 48 at left 2) + the latent crop's x 8, target
    (32, 32); SD 2.x has no such conditioning."""
    photo = Image.fromarray(torch.randint(0, 256, (48, 80, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    cfg = SimpleNamespace(resolution=32, center_crop=False, random_flip=False)
    base = Base.load(str(pipelines["sdxl"]), dtype="fp32")
    cache = T.LatentCache(base, [photo], cfg, torch.device("cpu"), show=False)
    mean = cache.items[0][0][0]
    assert cache.geometry == [((48, 80), (0, 2))]
    latents, cond = cache.sample(random.Random(7), torch.Generator().manual_seed(0), 5)
    assert latents.shape == (5, 4, 4, 4) and set(cond) == {"time_ids"} and cond["time_ids"].shape == (5, 6)
    rng = random.Random(7)  # the draws sample() made: image, view, crop top, crop left
    for row in cond["time_ids"].tolist():
        rng.randrange(1), rng.randrange(1)
        top, left = rng.randint(0, mean.shape[1] - 4), rng.randint(0, mean.shape[2] - 4)
        assert row == [48, 80, 0 + 8 * top, 2 + 8 * left, 32, 32]
    assert len({tuple(r) for r in cond["time_ids"].tolist()}) > 1  # the crops differ, so do the time ids
    sd2 = Base.load(str(pipelines["sd2"]), dtype="fp32")
    assert T.LatentCache(sd2, [photo], cfg, torch.device("cpu"), show=False).sample(
        random.Random(7), torch.Generator(), 2)[1] == {}


def test_sdxl_vae_loaded_in_fp16_encodes_in_fp32(pipelines):
    """SDXL's VAE overflows in fp16: a base loaded in fp16 encodes the photos with its VAE cast to fp32 (exactly
    what an fp32 copy of the fp16 weights gives) and keeps it in fp16 after; SD 2.x's encodes in fp16."""
    import copy

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    xl = Base.load(str(pipelines["sdxl"]), dtype="fp16")
    mean, std = xl.latent_dist(x)
    ref = copy.deepcopy(xl.vae).to(torch.float32).encode(x).latent_dist
    assert mean.dtype == torch.float32 and torch.equal(mean, ref.mean) and torch.equal(std, ref.std)
    assert xl.vae.dtype == torch.float16
    assert Base.load(str(pipelines["sd2"]), dtype="fp16").latent_dist(x)[0].dtype == torch.float16


def test_sdxl_peft_baselines_and_prior_preservation(pipelines, dataset_dir, tmp_path, monkeypatch):
    """The PEFT baselines on SDXL's to_q and to_k of every attention module, self and cross (the cross-attention's
    to_k takes the text width: not square): LoRA for two subjects in one batch (a bank of PEFT layers), and DoRA
    for one subject with prior preservation, whose class images the SDXL pipeline renders."""
    from diffusers import UNet2DConditionModel

    from dreambooth_singlora.adapter import attention_modules

    src, made, real = str(pipelines["sdxl"]), [], Base.pipeline

    def pipeline(self, *a, **k):
        pipe = real(self, *a, **k)
        made.append(type(pipe).__name__)
        return pipe

    monkeypatch.setattr(Base, "pipeline", pipeline)
    run = [*flags(src, dataset_dir), "--target_modules", "to_q", "to_k", "--max_train_steps", "2"]
    T.main([*run, "--method", "lora", "--subjects", *SUBJECTS, "--output_dir", str(tmp_path / "lora")])
    T.main([*run, "--method", "dora", "--subject", "dog", "--with_prior_preservation", "--num_class_images", "2",
            "--sample_batch_size", "2", "--output_dir", str(tmp_path / "dora")])

    attn = [name for name, _ in attention_modules(UNet2DConditionModel.from_pretrained(src, subfolder="unet"))]
    modules = {f"{a}.{p}" for a in attn for p in ("to_q", "to_k")}
    assert any(".attn2" in a for a in attn) and any(".attn1" in a for a in attn)
    lora = {s: weights(tmp_path / "lora" / s) for s in SUBJECTS}
    for s, w in lora.items():
        meta = json.loads((tmp_path / "lora" / s / "adapter_config.json").read_text())
        assert (meta["method"], meta["family"], meta["step"]) == ("lora", "sdxl", 2)
        assert set(meta["shapes"]) == modules and len({tuple(v) for v in meta["shapes"].values()}) > 2
        assert w.keys() == {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}
        assert all(w[k].abs().max() > 0 for k in w if "lora_B" in k)  # B starts at zero: trained
    assert rel_diff(lora["dog"], lora["cat"]) > 1e-4  # two subjects, two adapters
    dora = tmp_path / "dora"
    meta = json.loads((dora / "adapter_config.json").read_text())
    assert (meta["method"], meta["family"], meta["run"]["with_prior_preservation"]) == ("dora", "sdxl", True)
    assert {k.rsplit(".lora_", 1)[0] for k in weights(dora)} == modules
    assert any("magnitude" in k for k in weights(dora))
    assert len(list((dora / "class_images").glob("*.png"))) == 2
    assert made and set(made) == {"StableDiffusionXLPipeline"}


# --------------------------------------------------------------------------- generate, export, evaluate

@pytest.fixture(scope="module")
def rendered(runs, tmp_path_factory):
    """rendered(family): the dog adapter's first two evaluation prompts through `generate` (the CLI), one image
    each, into <images>/dog/ as `eval score` reads them."""
    from dreambooth_singlora.generate import main

    done = {}

    def get(family):
        if family not in done:
            images = tmp_path_factory.mktemp(f"images-{family}")
            prompts = [a for p in get_subject("dog").eval_prompts("sks")[:2] for a in ("--prompt", p)]
            main(["--adapter", str(runs(family).dog), *prompts, "--num_images_per_prompt", "1",
                  "--num_inference_steps", "2", "--height", "32", "--width", "32", "--output_dir", str(images / "dog")])
            done[family] = images
        return done[family]

    return get


def test_sdxl_generate_many_mixes_subjects_as_one_at_a_time(pipelines, tmp_path):
    """generate-many on SDXL: a SingLoRA and a LoRA adapter with strong random updates share a bank, every batch
    mixes subjects (and the classifier-free guidance's two halves with SDXL's pooled embeddings and time ids),
    DoRA renders on its own; each image equals that adapter's own render, to one level of 255 as on SD1.5
    (tests/test_multi.py: the same sums in batches of another make-up, rounded to 8 bits)."""
    from diffusers import UNet2DConditionModel

    from dreambooth_singlora.generate import GenerateConfig, generate_images, generate_many, load_pipeline
    from test_multi import make_adapters, png

    src = str(pipelines["sdxl"])
    made = make_adapters(src, UNet2DConditionModel.from_pretrained(src, subfolder="unet"), tmp_path / "adapters")
    adapters = {n: made[n] for n in ("one", "lora", "dora")}  # a SingLoRA and a LoRA banked, DoRA alone
    prompts = {n: ["a photo of sks dog"] for n in adapters}
    cfg = GenerateConfig(adapter=str(adapters["one"]), num_images_per_prompt=2, num_inference_steps=2, batch_size=3,
                         guidance_scale=7.5, merge=False, height=32, width=32)  # batches of 3: mixed subjects
    result = generate_many(load_pipeline(None, src, device="cpu", dtype="fp32"), adapters, cfg, tmp_path / "mixed",
                           prompts)
    assert result["batched"] == ["one", "lora"] and result["one_at_a_time"] == ["dora"]
    for name, folder in adapters.items():
        alone = load_pipeline(folder, device="cpu", dtype="fp32", merge=False)
        assert type(alone).__name__ == "StableDiffusionXLPipeline"
        generate_images(alone, cfg, prompts[name], tmp_path / "alone" / name)
        for f in sorted((tmp_path / "alone" / name).glob("*/*.png")):
            assert np.abs(png(f) - png(tmp_path / "mixed" / f.relative_to(tmp_path / "alone"))).max() <= 1, f
    one, lora = (png(tmp_path / "mixed" / n / "a-photo-of-sks-dog" / "0.png") for n in ("one", "lora"))
    assert np.abs(one - lora).mean() > 1  # same prompt and seed, other adapter: other image


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_generate_scores_and_uses_the_familys_pipeline(family, runs, rendered, dataset_dir, tiny_eval_checkpoints,
                                                       tmp_path):
    from dreambooth_singlora.eval.cli import main as eval_main
    from dreambooth_singlora.generate import load_pipeline

    pipe = load_pipeline(str(runs(family).dog), device="cpu", dtype="fp32", scheduler="ddim")
    assert type(pipe).__name__ == PIPELINE[family]
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    images = rendered(family)
    pngs = sorted((images / "dog").glob("*/0.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (32, 32) for p in pngs)
    ck = tiny_eval_checkpoints
    assert eval_main(["score", "--images", str(images), "--dataset_dir", dataset_dir, "--output", str(tmp_path / "e"),
                      "--subjects", "dog", "--max_prompts", "2", "--clip_checkpoint", str(ck["clip_dir"]),
                      "--dino_checkpoint", str(ck["dino_dir"]), "--device", "cpu", "--no_progress"]) == 0
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert scores["scored"] == dict(images=2, subjects=1, prompts=2)
    assert {p["kind"] for p in scores["skipped"]} == {"image_count"}  # 1 image a prompt where the protocol has 4


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_trained_adapter_exported_for_kohya_loads_in_diffusers(family, runs, pipelines, tmp_path):
    """`export --format kohya` of the trained adapter, read by diffusers' load_lora_weights into a fresh pipeline
    and fused: each projection is the project's own merge (test_families' check, on a trained adapter)."""
    from diffusers import UNet2DConditionModel

    from dreambooth_singlora.export import main as export_main

    path = tmp_path / "dog.safetensors"
    export_main(["--adapter", str(runs(family).dog), "--format", "kohya", "--output", str(path)])
    ours = UNet2DConditionModel.from_pretrained(pipelines[family], subfolder="unet")
    load_adapter(ours, runs(family).dog)
    merge_adapter(ours)
    check_kohya_file_fused_by_diffusers(family, pipelines[family], path, ours)


@pytest.mark.parametrize("trained, other", [("sd2", "sdxl"), ("sdxl", "sd2")])
def test_an_adapter_on_the_other_familys_base_is_refused_in_one_line(trained, other, runs, pipelines, tmp_path,
                                                                     capsys):
    from dreambooth_singlora.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--adapter", str(runs(trained).dog), "--pretrained_model_name_or_path", str(pipelines[other]),
              "--prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"trained on a {trained} base" in line and f"is {other} (" in line
    assert FAMILIES[other].label in line and not list((tmp_path / "out").rglob("*.png"))


# --------------------------------------------------------------------------- the default resolution

@pytest.mark.parametrize("family, sample_size, want", [("sd2", 96, 768), ("sd2", 64, 512), ("sdxl", 128, 1024)])
def test_default_resolution_is_the_unets_sample_size_times_the_vaes_factor(family, sample_size, want, pipelines,
                                                                           tmp_path):
    """Config-only folders shaped as SD 2.x 768-v (UNet sample size 96), 2.x-base (64) and SDXL (128), each with the
    real 4-level VAE (factor 8): the default --resolution, also for a single file through --base_config."""
    configs = copy_configs(pipelines[family], tmp_path / "m")
    for name, key, value in (("unet", "sample_size", sample_size), ("vae", "block_out_channels", [128, 256, 512, 512])):
        file = configs / name / "config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), key: value}))
    assert detect_family(str(configs)).name == family and default_resolution(str(configs)) == want
    (tmp_path / "model.safetensors").write_bytes(b"")  # read for its configs only
    assert default_resolution(str(tmp_path / "model.safetensors"), base_config=str(configs)) == want


# --------------------------------------------------------------------------- single-file checkpoints

@pytest.fixture(scope="module")
def single_file(tiny_pipeline, tmp_path_factory):
    """The tiny SD 1.x pipeline as one original-layout .safetensors file."""
    return write_single_file(tiny_pipeline, tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_single_file_loads_the_folders_weights(family, tiny_pipeline, pipelines, tmp_path):
    """Every tensor of the UNet, the VAE and each text encoder (SD2's and SDXL's second in OpenCLIP's layout in the
    file) as the folder has it; the scheduler (SD2: v-prediction) and tokenizers are --base_config's."""
    src = str({"sd1": tiny_pipeline, **pipelines}[family])
    path = str(write_single_file(src, tmp_path / "model.safetensors"))
    one, folder = Base.load(path, base_config=src), Base.load(src)
    assert one.family.name == folder.family.name == family and one.default_resolution == folder.default_resolution
    assert len(one.text_encoders) == (2 if family == "sdxl" else 1)
    for a, b in ((one.unet, folder.unet), (one.vae, folder.vae), *zip(one.text_encoders, folder.text_encoders)):
        assert same_weights(a, b)
    assert one.scheduler_config == folder.scheduler_config and one.prediction_type == folder.prediction_type
    assert [t("a dog").input_ids for t in one.tokenizers] == [t("a dog").input_ids for t in folder.tokenizers]
    if family == "sdxl":  # another VAE (--pretrained_vae_model_name_or_path) replaces the file's
        other = Base.load(path, base_config=src, vae=str(pipelines["sd2"] / "vae"))
        assert same_weights(other.vae, Base.load(str(pipelines["sd2"])).vae) and not same_weights(other.vae, one.vae)
        assert same_weights(other.unet, one.unet)


def test_a_single_file_trains_as_its_folder_and_generates_from_the_adapter_alone(single_file, tiny_pipeline,
                                                                                 dataset_dir, tmp_path):
    """The same weights (test above) train the same adapter: to FP64_TOL, not exactly, since diffusers reads the
    file's tensors into memory at other addresses than the folder's, and the CPU's matrix kernels sum in another
    order at another alignment (seen: 4e-7 in one float32 UNet call, 5e-4 of the weights after 4 Adam steps).
    Then `generate` renders from the adapter alone: it recorded the file and its --base_config."""
    from dreambooth_singlora.generate import main

    with float64():
        T.main([*flags(str(single_file), dataset_dir, base_config=str(tiny_pipeline)), "--subject", "dog",
                "--output_dir", str(tmp_path / "file")])
        T.main([*flags(str(tiny_pipeline), dataset_dir), "--subject", "dog", "--output_dir", str(tmp_path / "folder")])
    a, b = weights(tmp_path / "file"), weights(tmp_path / "folder")
    assert next(iter(a.values())).dtype == torch.float64 and rel_diff(a, b) < FP64_TOL
    assert rel_diff(a, weights(tmp_path / "file" / "checkpoints" / "checkpoint-2")) > 1e6 * FP64_TOL  # it trained
    meta = json.loads((tmp_path / "file" / "adapter_config.json").read_text())
    assert (meta["base_model"], meta["run"]["base_config"]) == (str(single_file), str(tiny_pipeline))
    small = ["--prompt", "a photo of sks dog", "--num_images_per_prompt", "1", "--num_inference_steps", "2",
             "--height", "32", "--width", "32"]
    main(["--adapter", str(tmp_path / "file"), *small, "--output_dir", str(tmp_path / "img")])
    assert len(list((tmp_path / "img").glob("*/0.png"))) == 1  # the adapter's file and --base_config, recorded
    main(["--pretrained_model_name_or_path", str(single_file), "--base_config", str(tiny_pipeline), *small,
          "--output_dir", str(tmp_path / "base")])  # the file alone, no adapter
    assert len(list((tmp_path / "base").glob("*/0.png"))) == 1


def test_a_single_file_without_base_config_is_refused_at_once(single_file, dataset_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--pretrained_model_name_or_path", str(single_file), "--subject", "dog", "--dataset_dir", dataset_dir,
                "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "single-file checkpoint" in line and "--base_config" in line
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_single_file_errors_are_one_line(single_file, tiny_pipeline, tiny_sdxl_pipeline, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="not a .safetensors file.*never pickled"):
        detect_family(str(tmp_path / "model.ckpt"), base_config=str(tiny_pipeline))
    with pytest.raises(UserError, match="--base_config is for a single-file checkpoint.*leave --base_config out"):
        detect_family(str(tiny_pipeline), base_config=str(tiny_pipeline))
    with pytest.raises(UserError) as e:  # an SD 1.x file with an SDXL folder's configs
        Base.load(str(single_file), base_config=str(tiny_sdxl_pipeline))
    assert "\n" not in str(e.value) and "Stable Diffusion XL" in str(e.value) and str(single_file) in str(e.value)
