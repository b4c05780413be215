"""SingLoRA math on the CPU, pure torch (no diffusers): shapes, rank, ramp, init, symmetry, batching."""

import pytest
import torch

from dreambooth_singlora.singlora import SingLoRA, delta_weight, init_A_, ramp, singlora_matmul

# (d_in, d_out): square (self-attention), d_in > d_out (SD1.5 cross-attention key 768 -> 320),
# d_in < d_out (768 -> 1280)
SHAPES = [(320, 320), (768, 320), (768, 1280)]
SHAPE_IDS = ["square", "in>out", "in<out"]
RANK = 8


def make_layer(d_in, d_out, u=1.0, alpha=8.0, rank=RANK, init="rank", seed=0) -> SingLoRA:
    torch.manual_seed(seed)
    layer = SingLoRA(d_in, d_out, rank, alpha, init)
    layer.set_ramp(u)
    return layer


@pytest.mark.parametrize("d_in,d_out", SHAPES, ids=SHAPE_IDS)
def test_delta_shape_and_rank_at_most_r(d_in, d_out):
    layer = make_layer(d_in, d_out)
    assert layer.A.shape == (max(d_in, d_out), RANK)
    delta = layer.delta_weight()
    assert delta.shape == (d_out, d_in)
    assert torch.linalg.matrix_rank(delta) <= RANK  # default tolerance: fp32 eps * max(d_in, d_out)
    out = layer(torch.randn(3, 5, d_in))
    assert out.shape == (3, 5, d_out)


@pytest.mark.parametrize("d_in,d_out", SHAPES, ids=SHAPE_IDS)
def test_u_zero_gives_exactly_zero_delta_and_the_base_output(d_in, d_out):
    layer = make_layer(d_in, d_out, u=0.0)
    base = torch.nn.Linear(d_in, d_out)
    x = torch.randn(4, d_in)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.count_nonzero(layer(x)) == 0
    assert torch.equal(base(x) + layer(x), base(x))


@pytest.mark.parametrize("d_in,d_out", SHAPES, ids=SHAPE_IDS)
def test_two_matmuls_equal_the_explicit_delta(d_in, d_out):
    layer = make_layer(d_in, d_out, u=0.7, alpha=4.0)
    x = torch.randn(2, 6, d_in)
    explicit = x @ layer.delta_weight().T  # (2, 6, d_out)
    # float32 tolerance: the two orders of summation differ only by rounding
    torch.testing.assert_close(layer(x), explicit, rtol=1e-5, atol=1e-5)
    assert explicit.abs().max() > 1e-2  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("step,ramp_steps,u", [
    (0, 10, 0.0), (1, 4, 0.25), (5, 10, 0.5), (9, 10, 0.9), (10, 10, 1.0), (400, 10, 1.0),
    (0, 0, 1.0), (7, 0, 1.0),  # T = 0: no ramp, u = 1 from the first step, no division by zero
])
def test_ramp(step, ramp_steps, u):
    assert ramp(step, ramp_steps) == pytest.approx(u, abs=1e-12)


def test_ramp_rejects_negative_steps():
    with pytest.raises(ValueError, match="step"):
        ramp(-1, 10)


@pytest.mark.parametrize("init,fan_in", [("width", "d_in"), ("rank", "r")])
@pytest.mark.parametrize("d_in,d_out", SHAPES, ids=SHAPE_IDS)
def test_init_variance(init, fan_in, d_in, d_out):
    torch.manual_seed(0)
    A = torch.empty(max(d_in, d_out), 64)  # a wider A than r = 8 only for a tighter variance estimate
    init_A_(A, d_in, init)
    n = d_in if fan_in == "d_in" else A.shape[-1]
    # uniform(-1/sqrt(n), 1/sqrt(n)) has variance 1/(3n); >= 20k samples put the estimate within ~3%
    assert A.var().item() == pytest.approx(1 / (3 * n), rel=0.05)
    assert A.abs().max() <= 1 / n ** 0.5
    layer = SingLoRA(d_in, d_out, 64, 64.0, init)
    assert layer.A.var().item() == pytest.approx(1 / (3 * n), rel=0.05)


def test_unknown_init_and_bad_rank_are_rejected():
    with pytest.raises(ValueError, match="width"):
        init_A_(torch.empty(4, 2), 4, "xavier")
    with pytest.raises(ValueError, match="rank"):
        SingLoRA(4, 4, 0, 1.0)


@pytest.mark.parametrize("alpha", [1.0, 8.0, 32.0])
def test_square_delta_is_symmetric_psd(alpha):
    layer = make_layer(64, 64, u=0.5, alpha=alpha)
    delta = layer.delta_weight().double()
    torch.testing.assert_close(delta, delta.T, rtol=0, atol=1e-6)
    eig = torch.linalg.eigvalsh(delta)
    assert eig.min() >= -1e-6 * eig.max()
    assert (eig > 1e-6 * eig.max()).sum() == RANK  # r positive eigenvalues, the rest zero


@pytest.mark.parametrize("d_in,d_out", SHAPES, ids=SHAPE_IDS)
def test_batched_A_equals_per_sample_calls(d_in, d_out):
    torch.manual_seed(0)
    A = torch.randn(3, max(d_in, d_out), RANK) * 0.05  # one adapter per sample
    x = torch.randn(3, 5, d_in)
    batched = singlora_matmul(x, A, d_in, d_out, 0.5)
    per_sample = torch.stack([singlora_matmul(x[b], A[b], d_in, d_out, 0.5) for b in range(3)])
    assert batched.shape == (3, 5, d_out)
    torch.testing.assert_close(batched, per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_sample[1], x[1] @ delta_weight(A[1], d_in, d_out, 0.5).T,
                               rtol=1e-5, atol=1e-6)


def test_gradient_reaches_only_A_and_scales_with_u():
    layer = make_layer(48, 32, u=0.0)
    x = torch.randn(4, 48)
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.A.grad) == 0  # u = 0: the update, and its gradient, are off
    layer.A.grad = None
    layer.set_ramp(1.0)
    layer(x).sum().backward()
    assert layer.A.grad.abs().sum() > 0
    assert [name for name, _ in layer.named_parameters()] == ["A"]
