"""experiments/synthetic_attention.py: a tiny run of the LoRA vs SingLoRA attention experiment, end to end."""

import json
import math

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def synthetic():
    return load_script("synthetic_attention")


@pytest.fixture(scope="module")
def tiny_run(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    argv = ["--seeds", "2", "--steps", "40", "--dim", "16", "--rank", "2", "--tokens", "8",
            "--train_sequences", "32", "--eval_sequences", "8", "--eval_every", "10",
            "--lrs", "1e-2", "3e-2", "--output", str(out / "r.json"), "--plot", str(out / "r.png")]
    returned = synthetic.main(argv)
    with open(out / "r.json") as f:
        return returned, json.load(f), out


def test_json_has_both_methods_and_every_lr(tiny_run):
    _, res, _ = tiny_run
    assert res == json.loads(json.dumps(tiny_run[0]))  # what main returns is what it wrote
    assert set(res["targets"]) == {"general", "psd"}
    for tr in res["targets"].values():
        assert set(tr["methods"]) == {"lora", "singlora"}
        for m in tr["methods"].values():
            assert set(m["by_lr"]) == {repr(1e-2), repr(3e-2)}
            assert all(len(r["final_per_seed"]) == 2 for r in m["by_lr"].values())
    assert res["config"]["ramp_steps"] == 4  # T = 10% of 40 steps, recorded


def test_parameter_counts_equal(tiny_run):
    _, res, _ = tiny_run
    d, r = 16, 2
    for tr in res["targets"].values():
        lora, sing = tr["methods"]["lora"], tr["methods"]["singlora"]
        assert (lora["rank"], sing["rank"]) == (r, 2 * r)
        assert lora["params_per_seed"] == {"q": 2 * r * d, "k": 2 * r * d}  # B (d, r) + A (r, d)
        assert sing["params_per_seed"] == {"q": d * 2 * r, "k": d * 2 * r}  # A (d, 2r)
    assert res["params_per_seed"] == {"lora": 128, "singlora": 128}


def test_losses_decrease_for_both_methods(tiny_run):
    _, res, _ = tiny_run
    for tr in res["targets"].values():
        assert tr["initial_mean"] > 0
        for m in tr["methods"].values():
            for r in m["by_lr"].values():
                curve = r["curve_mean"]
                assert all(math.isfinite(x) for x in curve)
                assert curve[0] == pytest.approx(tr["initial_mean"], rel=1e-5)  # u(0) = 0, B = 0: the base
                assert curve[-1] < 0.7 * curve[0]


def test_plot_written(tiny_run):
    _, _, out = tiny_run
    with open(out / "r.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_rank_is_one_line_error(synthetic, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--dim", "8", "--rank", "5", "--output", "", "--plot", ""])
    assert e.value.code == 2
    assert "2r must be <= --dim 8" in capsys.readouterr().err


def test_quartiles_and_seed_range_recorded(tiny_run):
    _, res, _ = tiny_run
    assert res["config"]["seed_offset"] == 0
    for tr in res["targets"].values():
        for m in tr["methods"].values():
            for r in m["by_lr"].values():
                assert r["final_q25"] <= r["final_median"] <= r["final_q75"]
            assert m["best_lr"] == float(min(m["by_lr"], key=lambda k: m["by_lr"][k]["final_median"]))


def test_seed_offset_picks_other_problems(synthetic):
    cfg = synthetic.Config(seeds=1, seed_offset=5, dim=8, rank=2, output="", plot="")
    a, b = synthetic.make_problem(cfg, "general", 5), synthetic.make_problem(cfg, "general", 0)
    assert not (a["Wq"] == b["Wq"]).all()


def test_negative_seed_offset_is_one_line_error(synthetic, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--seed_offset", "-1", "--output", "", "--plot", ""])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
