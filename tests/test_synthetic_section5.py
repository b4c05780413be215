"""experiments/synthetic_section5.py and experiments/synthetic_common.py: the section-5 task, end to end on a
tiny config."""

import json

import pytest
from helpers import load_script
import torch


def load(name):
    return load_script(name)


@pytest.fixture(scope="module")
def common():
    return load("synthetic_common")


@pytest.fixture(scope="module")
def s5():
    return load("synthetic_section5")


TINY = ["--seeds", "6", "--sweep_seeds", "3", "--steps", "40", "--dim", "16", "--tokens", "8", "--rank", "2",
        "--lr", "1e-2", "--lrs", "1e-3", "1e-2", "--eval_every", "10"]


@pytest.fixture(scope="module")
def tiny_run(s5, tmp_path_factory):
    out = tmp_path_factory.mktemp("s5")
    returned = s5.main(TINY + ["--output", str(out / "r.json"), "--plot", str(out / "r.png")])
    with open(out / "r.json") as f:
        return returned, json.load(f), out


def test_equal_parameters_and_equal_rank(s5):
    d, r = 16, 2
    cfg = s5.Config(dim=d, rank=r, output="", plot="")
    lora, eq_par, eq_rank = s5.methods(cfg)
    assert (lora.kind, eq_par.kind, eq_rank.kind) == ("lora", "singlora", "singlora")
    assert lora.params_per_projection(d) == eq_par.params_per_projection(d) == 2 * r * d
    assert (lora.rank, eq_rank.rank) == (r, r)  # equal rank: both r
    assert eq_rank.params_per_projection(d) == r * d


def test_delta_ranks_are_the_nominal_ranks(common):
    """The update each adapter can make has exactly its nominal rank (float64, generic random factors)."""
    d, r = 12, 3
    eye = torch.eye(d, dtype=torch.float64)[None]  # (1, d, d): delta(x = I) is delta W^T
    for m in (common.Method("l", "lora", r), common.Method("s", "singlora", r)):
        ad = common.Adapters(m, d, seeds=[0])
        with torch.no_grad():
            for p in ad.params["q"]:
                p.data = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        dW = ad.delta("q", eye, u=1.0)[0]  # (d, d)
        assert int(torch.linalg.matrix_rank(dW)) == r
        if m.kind == "singlora":
            torch.testing.assert_close(dW, dW.T)  # A A^T: symmetric


def test_tiny_run_counts_and_outputs(tiny_run):
    returned, res, out = tiny_run
    assert res == json.loads(json.dumps(returned))  # what main returns is what it wrote
    d, r = 16, 2
    assert res["params_per_seed"] == {"lora_r2": 4 * r * d, "singlora_r4": 4 * r * d, "singlora_r2": 2 * r * d}
    for m in res["methods"].values():
        assert set(m["by_lr"]) == {repr(1e-3), repr(1e-2)}
        assert len(m["fixed_lr"]["median"]) == len(res["steps"]) == 40 // 10 + 1
        assert m["fixed_lr"]["runs"] == 6 and m["by_lr"][repr(1e-3)]["runs"] == 3
        for s in m["by_lr"].values():
            assert s["q25"] <= s["median"] <= s["q75"]
    assert res["config"]["ramp_steps"] == 4  # 10% of 40 steps, recorded
    assert res["methods"]["singlora_r4"]["ramp_steps"] == 4 and res["methods"]["lora_r2"]["ramp_steps"] == 0
    with open(out / "r.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| lr |" in load("synthetic_section5").markdown_tables(res)


def test_all_methods_start_at_the_base_layer_and_descend(tiny_run):
    _, res, _ = tiny_run
    starts = {n: m["fixed_lr"]["median"][0] for n, m in res["methods"].items()}
    assert len(set(starts.values())) == 1  # B = 0 and u(0) = 0: delta W is exactly 0 at step 0
    assert starts["lora_r2"] == res["initial_loss"]["median"]
    for m in res["methods"].values():
        assert m["fixed_lr"]["median"][-1] < m["fixed_lr"]["median"][0]
        assert m["fixed_lr"]["diverged"] == 0


def test_batched_adamw_matches_torch_adamw(common):
    """Two runs with different lrs in one batch == two torch.optim.AdamW runs (float64)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    x0 = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    lrs = torch.tensor([1e-2, 3e-1], dtype=torch.float64)
    x = x0.clone().requires_grad_()
    opt = common.BatchedAdamW([(x, lrs.view(2, 1, 1))], weight_decay=0.1)
    for _ in range(20):
        opt.zero_grad()
        ((x - target) ** 3).abs().sum().backward()
        opt.step()
    for i in range(2):
        y = x0[i].clone().requires_grad_()
        ref = torch.optim.AdamW([y], lr=float(lrs[i]), weight_decay=0.1)
        for _ in range(20):
            ref.zero_grad()
            ((y - target[i]) ** 3).abs().sum().backward()
            ref.step()
        torch.testing.assert_close(x[i].detach(), y.detach())


def test_batched_runs_are_independent(common):
    """A run's trajectory does not depend on which other runs share its batch (float64)."""
    m = common.Method("s", "singlora", 4, ramp_steps=3)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        many = common.train(m, [1e-2, 3e-2], [0, 1, 2], tokens=6, dim=8, steps=12, eval_every=4)
        one = common.train(m, [3e-2], [1], tokens=6, dim=8, steps=12, eval_every=4)
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(many["loss"][1, 1], one["loss"][0, 0])


def test_loraplus_b_learning_rate(common):
    ad = common.Adapters(common.Method("p", "lora", 2, b_lr_ratio=16.0), 8, seeds=[0, 1])
    lr = torch.tensor([1e-3, 2e-3])
    groups = ad.groups(lr)
    assert len(groups) == 4  # (A, B) x (q, k)
    for (A, lr_a), (B, lr_b) in (groups[0:2], groups[2:4]):
        assert A.shape == (2, 2, 8) and B.shape == (2, 8, 2)
        assert torch.equal(lr_b, lr_a * 16.0)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "2", "--sweep_seeds", "3"], "--sweep_seeds 3 must be <= --seeds 2"),
    (["--dim", "8", "--rank", "5"], "2r must be <= --dim 8"),
    (["--lrs", "0"], "learning rates must be positive"),
])
def test_bad_flag_is_one_line_error(s5, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        s5.main(argv + ["--output", "", "--plot", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
