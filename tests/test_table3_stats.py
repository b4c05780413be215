"""Table 3's statistics without training: the paired bootstrap (eval.metrics.paired_bootstrap), the --seeds
layout and the table on a small synthetic scores input.

Tolerances. Equal inputs are compared exactly (every difference is 0.0, so every resample mean is 0.0).
For a constant shift c, a_i = fl(b_i + c) and d_i = fl(a_i - b_i) are each one rounding, so
|d_i - c| <= eps * (|b_i| + |c|); a float64 mean of n such values adds at most n * eps * max|d| (a crude
bound on a sum's rounding) and the quantile's interpolation one more rounding, hence
tol = 2 * (n + 4) * eps * (max|b| + |c|). The synthetic scores are dyadic (multiples of 2^-10), so their
seed means and differences are exact and the intervals are compared exactly.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dreambooth_singlora.errors import UserError
from dreambooth_singlora.eval.metrics import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
EPS = torch.finfo(torch.float64).eps


def load_table3():
    from dreambooth_singlora.eval import table3

    return table3


def test_bootstrap_of_a_method_against_itself_is_exactly_zero():
    a = torch.rand(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    r = paired_bootstrap(a, a)
    assert (r["mean"], r["low"], r["high"]) == (0.0, 0.0, 0.0) and r["n"] == 30 and r["n_resamples"] == 10_000


def test_bootstrap_of_a_constant_shift_is_that_shift():
    b = torch.rand(30, generator=torch.Generator().manual_seed(2), dtype=torch.float64).tolist()
    c = 0.0371
    a = [x + c for x in b]
    r = paired_bootstrap(a, b)
    tol = 2 * (len(b) + 4) * EPS * (max(map(abs, b)) + abs(c))  # module docstring
    for k in ("mean", "low", "high"):
        assert abs(r[k] - c) <= tol, (k, r[k] - c, tol)


def test_bootstrap_two_subjects_and_determinism():
    # d = (0, 1): a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are 0 and 1 unless fewer than 2.5% of 10,000 resamples hit an end (expected 25%: never seen)
    r = paired_bootstrap([1.0, 2.0], [1.0, 1.0])
    assert (r["mean"], r["low"], r["high"]) == (0.5, 0.0, 1.0)
    a = torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()
    b = torch.rand(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64).tolist()
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)  # fixed RNG seed: the same interval every run
    one = paired_bootstrap([0.7], [0.5])
    assert one["low"] is None and one["high"] is None and abs(one["mean"] - 0.2) <= 2 * EPS
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_seeds_layout_keeps_the_one_seed_layout_for_the_first_seed(tmp_path):
    mod = load_table3()
    runs = mod.seed_runs(["lora_r8", "dora_r8"], 3)
    assert [(r.name, r.seed, r.group, r.method) for r in runs] == [
        ("lora_r8", 0, "lora_r8", "lora"), ("lora_r8_seed1", 1, "lora_r8", "lora"),
        ("lora_r8_seed2", 2, "lora_r8", "lora"), ("dora_r8", 0, "dora_r8", "dora"),
        ("dora_r8_seed1", 1, "dora_r8", "dora"), ("dora_r8_seed2", 2, "dora_r8", "dora")]
    assert [r.name for r in mod.seed_runs(["lora_r8"], 2, first_seed=5)] == ["lora_r8", "lora_r8_seed6"]
    assert mod.seed_runs(["lora_r8"], 1) == [mod.Run("lora_r8", "lora", 8, 0, "lora_r8")]  # today's layout
    with pytest.raises(UserError):
        mod.seed_runs(["lora_r8"], 0)
    args = SimpleNamespace(pretrained_model_name_or_path="base", dataset_dir="d", work_dir=tmp_path,
                           max_train_steps=3, resolution=32, mixed_precision="no", train_args=[],
                           num_inference_steps=2, guidance_scale=7.5, num_images_per_prompt=4,
                           render_batch_size=4, compile=False, max_prompts=None, instance_prompt_template=None)
    one = mod.train_command(args, runs[4], ["dog"], one_subject=True)
    assert one[one.index("--output_dir") + 1] == str(tmp_path / "adapters" / "dora_r8_seed1" / "dog")
    assert one[one.index("--seed") + 1] == "1" and "--instance_prompt" not in one
    argv = mod.render_argv(args, runs[1], ["dog"])
    assert argv[argv.index("--output") + 1] == str(tmp_path / "images" / "lora_r8_seed1")
    assert argv[argv.index("--seed") + 1] == "1"
    args.instance_prompt_template = "a photo of a {identifier} {cls}"
    one = mod.train_command(args, runs[0], ["backpack"], one_subject=True)
    assert one[one.index("--instance_prompt") + 1] == "a photo of a sks backpack"


SUBJECTS = {"dog": 600, "cat": 420, "backpack": 700}   # base scores in units of 2^-10
SEED_NOISE = (0, 16)                                   # seed 1 adds 16 / 1024 to every subject
SHIFT = 8                                              # singlora = lora + 8 / 1024


def synthetic(mod):
    """2 rows x 2 seeds x 3 subjects of scores.json-like results, every value a multiple of 2^-10."""
    runs = mod.seed_runs(["lora_r8", "singlora_r8"], 2)
    results = {}
    for r in runs:
        shift = SHIFT if r.group == "singlora_r8" else 0
        subj = {s: {m: (v + SEED_NOISE[r.seed] + shift + k) / 1024 for k, m in enumerate(("dino", "clip_i", "clip_t"))}
                for s, v in SUBJECTS.items()}
        summary = {m: dict(mean=math.fsum(x[m] for x in subj.values()) / len(subj), std=None)
                   for m in ("dino", "clip_i", "clip_t")}
        results[r.name] = dict(metrics=["dino", "clip_i", "clip_t"], subjects=subj, summary={"all": summary})
    return mod, runs, results


def test_table_on_synthetic_scores():
    mod, runs, results = synthetic(load_table3())
    stats = mod.group_stats(results, runs)
    lora, sing = stats["lora_r8"], stats["singlora_r8"]
    assert lora["runs"] == ["lora_r8", "lora_r8_seed1"] and lora["seeds"] == [0, 1]
    for k, m in enumerate(("dino", "clip_i", "clip_t")):
        per = {s: (v + 8 + k) / 1024 for s, v in SUBJECTS.items()}  # mean over the two seeds: +16/2
        assert lora["metrics"][m]["subjects"] == per  # exact: dyadic
        expected = math.fsum(per.values()) / 3
        assert abs(lora["metrics"][m]["mean"] - expected) <= 2 * EPS * expected
        assert lora["metrics"][m]["difference"] is None  # the baseline is not compared with itself
        # seed runs' means differ by 16/1024: sample std of two values = 16/1024 / sqrt(2)
        assert abs(lora["metrics"][m]["std_seeds"] - 16 / 1024 / math.sqrt(2)) <= 4 * EPS
        d = sing["metrics"][m]["difference"]
        assert (d["mean"], d["low"], d["high"], d["n"]) == (SHIFT / 1024, SHIFT / 1024, SHIFT / 1024, 3)
    assert "dino_patch" not in lora["metrics"]  # not scored, not shown
    table = mod.table3(results, runs, None, stats)
    assert "| lora_r8 | 2 |" in table and "| singlora_r8 | 2 |" in table and "DINO patch" not in table.split("\n\n")[1]
    assert "| singlora_r8 | 3 | +0.008 [+0.008, +0.008] |" in table
    assert "about 0.15" in table and "about 0.67" in table and "10000 resamples" in table
    assert '"a photo of sks <class>"' in table and "400 optimizer steps" in table


def test_provenance_says_when_a_run_is_not_the_protocol():
    mod = load_table3()
    args = SimpleNamespace(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                           dataset_dir="data", family="sd1", max_train_steps=400, resolution=512, mixed_precision="bf16", train_args=[],
                           num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=4, max_prompts=None,
                           render_batch_size=16, compile=False, encoders=["clip", "dino"], dino_patch_tokens=True,
                           clip_checkpoint=None, dino_checkpoint=None, instance_prompt_template=None)
    from dreambooth_singlora.prompts import subjects

    runs = mod.seed_runs(["lora_r8"], 3)
    prov = mod.provenance(args, runs, list(subjects()))
    assert prov["differs from the protocol"] == "nothing" and prov["seeds"] == "0, 1, 2"
    assert "400 optimizer steps" in prov["training"] and "'a photo of {identifier} {cls}'" in prov["training"]
    args.max_train_steps, args.resolution = 2, 32
    toy = mod.provenance(args, runs, ["dog"])["differs from the protocol"]
    assert "max_train_steps 2 (protocol: 400)" in toy and "resolution 32 (protocol: 512)" in toy
    assert "subjects 1 (protocol: 30)" in toy
    args.family = "sdxl"  # another family's base (Table 3 is SD 1.5's)
    assert "family sdxl (protocol: sd1)" in mod.provenance(args, runs, ["dog"])["differs from the protocol"]


def test_the_base_gives_the_family_and_the_default_resolution(tiny_sdxl_pipeline, tmp_path):
    """Table 3 on another family's base: its family recorded (and flagged beside the protocol's, above), its own
    resolution unless --resolution says otherwise."""
    from dreambooth_singlora.base import default_resolution

    mod = load_table3()
    args = SimpleNamespace(pretrained_model_name_or_path=str(tiny_sdxl_pipeline), resolution=None, stages=["train"])
    mod.resolve_base(args)
    assert args.family == "sdxl" and args.resolution == default_resolution(str(tiny_sdxl_pipeline))
    args.resolution = 40
    mod.resolve_base(args)
    assert args.resolution == 40
    # scoring alone needs no base: what the trained adapters recorded
    score = SimpleNamespace(pretrained_model_name_or_path=str(tmp_path / "gone"), resolution=None, stages=["score"],
                            work_dir=tmp_path)
    mod.resolve_base(score)
    assert (score.family, score.resolution) == (None, None)  # nothing trained: unknown
    (tmp_path / "adapters" / "lora_r8" / "dog").mkdir(parents=True)
    (tmp_path / "adapters" / "lora_r8" / "dog" / "adapter_config.json").write_text(
        json.dumps({"family": "sdxl", "run": {"resolution": 1024}}))
    mod.resolve_base(score)
    assert (score.family, score.resolution) == ("sdxl", 1024)


# ---------------------------------------------------------------------------------------------
# rows as data

def test_default_and_named_rows_and_their_trainer_flags(tmp_path):
    mod = load_table3()
    assert [r.name for r in mod.select_rows()] == ["lora_r8", "loraplus_r8", "dora_r8", "singlora_r8", "singlora_r16"]
    assert all(r.train_args() == () for r in mod.PAPER_ROWS)  # the paper's rows: the trainer's defaults
    rows = mod.select_rows(["lora_r8", "singlora_r8_noramp", "singlora_r8_rankinit", "singlora_r8_qkvo"])
    assert [r.train_args() for r in rows[1:]] == [
        ("--ramp_steps", "0"), ("--init", "rank"), ("--target_modules", "to_q", "to_k", "to_v", "to_out.0")]
    args = SimpleNamespace(pretrained_model_name_or_path="base", dataset_dir="d", work_dir=tmp_path,
                           max_train_steps=3, resolution=32, mixed_precision="no", train_args=["--ramp_steps", "5"],
                           instance_prompt_template=None)
    run = mod.seed_runs(rows, 1)[1]
    cmd = mod.train_command(args, run, ["dog"], one_subject=True)
    assert cmd[-4:] == ["--ramp_steps", "0", "--ramp_steps", "5"]  # the row's flag, then --train_args (which win)


def test_rows_file_json_and_csv(tmp_path):
    mod = load_table3()
    items = [{"name": "sing_lr3e-4", "method": "singlora", "rank": 8, "learning_rate": 3e-4},
             {"name": "sing_qv", "method": "singlora", "rank": 4, "ramp_steps": 0, "init": "rank",
              "target_modules": ["to_q", "to_v"]}]
    (tmp_path / "rows.json").write_text(__import__("json").dumps(items))
    (tmp_path / "rows.csv").write_text("name,method,rank,learning_rate,ramp_steps,init,target_modules\n"
                                       "sing_lr3e-4,singlora,8,3e-4,,,\n"
                                       "sing_qv,singlora,4,,0,rank,to_q to_v\n")
    from_json, from_csv = mod.read_rows_file(tmp_path / "rows.json"), mod.read_rows_file(tmp_path / "rows.csv")
    assert from_json == from_csv
    assert from_json[0].train_args() == ("--learning_rate", "0.0003")
    assert from_json[1].train_args() == ("--ramp_steps", "0", "--init", "rank", "--target_modules", "to_q", "to_v")
    both = mod.select_rows(["lora_r8"], tmp_path / "rows.json")
    assert [r.name for r in both] == ["lora_r8", "sing_lr3e-4", "sing_qv"]
    bad = {"unknown field 'lr'": [{"name": "a", "method": "lora", "rank": 8, "lr": 1}],
           "no 'rank'": [{"name": "a", "method": "lora"}],
           "unknown method 'vera'": [{"name": "a", "method": "vera", "rank": 8}],
           "must be a folder name": [{"name": "../a", "method": "lora", "rank": 8}],
           "bad target_modules": [{"name": "a", "method": "lora", "rank": 8, "target_modules": ["to_x"]}],
           "given twice with different settings": [{"name": "a", "method": "lora", "rank": 8},
                                                   {"name": "a", "method": "lora", "rank": 4}]}
    for message, content in bad.items():
        (tmp_path / "bad.json").write_text(__import__("json").dumps(content))
        with pytest.raises(UserError, match=message):
            mod.select_rows(None, tmp_path / "bad.json")


def test_every_row_is_paired_against_lora_including_ablations():
    mod = load_table3()
    rows = mod.select_rows(["lora_r8", "singlora_r8", "singlora_r8_noramp"])
    runs = mod.seed_runs(rows, 1)
    results = {}
    for k, r in enumerate(runs):  # row k = lora + k / 1024 on every subject and metric
        subj = {s: {m: (v + k) / 1024 for m in ("dino", "clip_i", "clip_t")} for s, v in SUBJECTS.items()}
        results[r.name] = dict(metrics=["dino", "clip_i", "clip_t"], subjects=subj,
                               summary={"all": {m: dict(mean=None, std=None) for m in ("dino", "clip_i", "clip_t")}})
    stats = mod.group_stats(results, runs)
    assert stats["singlora_r8_noramp"]["metrics"]["dino"]["difference"]["mean"] == 2 / 1024  # exact: dyadic
    table = mod.table3(results, runs, None, stats, rows)
    assert "| singlora_r8_noramp | 3 | +0.002 [+0.002, +0.002] |" in table
    assert "| singlora_r8_noramp | 1 |" in table and "| - | - | - |" in table  # no paper numbers for it
    assert "singlora_r8_noramp = singlora r8, ramp_steps 0" in table


def test_the_script_is_the_package_command():
    """scripts/reproduce_table3.py runs `eval table3`, and imported (experiments/lr_sweep.py does) it is the
    package module itself, so a patch of its stages is a patch of the package's."""
    import subprocess
    import sys

    script = ROOT / "scripts" / "reproduce_table3.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--rows_file" in r.stdout and "singlora_r8_noramp" in r.stdout
    sys.path.insert(0, str(script.parent))
    try:
        sys.modules.pop("reproduce_table3", None)
        import reproduce_table3
    finally:
        sys.path.remove(str(script.parent))
        sys.modules.pop("reproduce_table3", None)
    assert reproduce_table3 is load_table3()
