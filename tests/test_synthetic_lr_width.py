"""experiments/synthetic_lr_width.py: the learning-rate x width sweep on a tiny config, and its summary maths."""

import json

import pytest
from helpers import load_script
import torch


@pytest.fixture(scope="module")
def lw():
    return load_script("synthetic_lr_width")


@pytest.fixture(scope="module")
def tiny_run(lw, tmp_path_factory):
    out = tmp_path_factory.mktemp("lw")
    argv = ["--widths", "8", "16", "--seeds", "2", "--steps", "30", "--tokens", "6", "--rank", "2",
            "--lrs", "1e-3", "1e-2", "1e-1", "--output", str(out / "r.json"), "--plot", str(out / "r.png")]
    returned = lw.main(argv)
    with open(out / "r.json") as f:
        return returned, json.load(f), out


def test_tiny_run_writes_everything(lw, tiny_run):
    returned, res, out = tiny_run
    assert res == json.loads(json.dumps(returned))
    assert set(res["methods"]) == set(lw.METHODS)
    for name, m in res["methods"].items():
        assert set(m["widths"]) == {"8", "16"}
        for d, w in m["widths"].items():
            d, r = int(d), 2
            assert sum(w["params_per_seed"].values()) == 2 * 2 * r * d  # every method: 2 r d per projection
            assert w["best_lr"] in (1e-3, 1e-2, 1e-1) and w["best_lr"] in w["band_lrs"]
            assert w["band_factor"] == pytest.approx(max(w["band_lrs"]) / min(w["band_lrs"]))
            assert 0 <= w["diverged_share"] <= 1
    assert res["methods"]["loraplus"]["b_lr_ratio"] == 16.0
    assert res["methods"]["singlora_rank"]["init"] == "rank" and res["methods"]["singlora_width"]["init"] == "width"
    with open(out / "r.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| method | d |" in lw.markdown_table(res)


def test_width_and_sane_lr_descend(tiny_run):
    _, res, _ = tiny_run
    for name in ("lora", "singlora_width"):
        for w in res["methods"][name]["widths"].values():
            assert w["by_lr"][repr(1e-2)]["median"] < w["initial_median"]


def test_lr_summary_on_known_losses(lw):
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    start = torch.full((4, 3), 10.0)
    final = torch.tensor([[4.0, 4.0, 4.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [float("nan"), 20.0, 1.0]])
    loss = torch.stack([start, final], dim=-1)  # (L, S, 2 points)
    s = lw.lr_summary(lrs, loss, band=2.0)
    assert s["best_lr"] == 1e-2 and s["best_median"] == 1.0
    assert s["band_lrs"] == [1e-2, 1e-1]  # 2.0 <= 2 x 1.0; 4.0 is not; lr 1.0's median is 20 (nan counts as +inf)
    assert s["band_factor"] == 10.0
    assert s["diverged_share"] == float(f"{2 / 12:.4g}")  # the nan and the 20 > 10 (JSON keeps 4 digits)
    assert s["nonfinite_share"] == float(f"{1 / 12:.4g}")


def test_slope(lw):
    widths = [64, 128, 256, 512]
    assert lw.slope(widths, [0.1 / w for w in widths]) == pytest.approx(-1.0, abs=1e-12)
    assert lw.slope(widths, [0.01] * 4) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dora"], "unknown --methods ['dora']"),
    (["--widths", "4", "--rank", "4"], "SingLoRA's rank 2r = 8"),
    (["--band", "0.5"], "--band must be >= 1"),
])
def test_bad_flag_is_one_line_error(lw, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        lw.main(argv + ["--output", "", "--plot", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
