"""Tests for deltakit.adamr: AdamR reduces to Adam at λ = 0, pulls deltas toward θ_pre at the predicted rate
(L2 geometric, L1 linear), leaves parameters without a pre-trained tensor alone, and survives a state_dict
round trip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from deltakit.adamr import AdamR, adamr_param_groups


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _pre_of(model: nn.Module, seed: int = 99) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in model.parameters()]


def test_weight_decay_zero_is_exactly_adam():
    model_r, model_a = _mlp(), _mlp()
    opt_r = AdamR(model_r.parameters(), _pre_of(model_r), lr=1e-2, weight_decay=0.0)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2, foreach=False)
    _train(model_r, opt_r, range(20))
    _train(model_a, opt_a, range(20))
    for p_r, p_a in zip(model_r.parameters(), model_a.parameters()):
        torch.testing.assert_close(p_r, p_a)  # fp32 tolerance; in practice bit-identical
    moved = sum(float((p.detach() - q.detach()).abs().sum()) for p, q in zip(model_r.parameters(), _mlp().parameters()))
    assert moved > 0.1  # the trajectories are not trivially equal


def test_weight_decay_changes_the_trajectory_toward_pre():
    model_r, model_a = _mlp(), _mlp()
    pre = [p.detach().clone() for p in _mlp(seed=5).parameters()]
    opt_r = AdamR(model_r.parameters(), pre, lr=1e-2, weight_decay=5.0)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2, foreach=False)
    _train(model_r, opt_r, range(20))
    _train(model_a, opt_a, range(20))
    dist_r = sum(float((p.detach() - q).square().sum()) for p, q in zip(model_r.parameters(), pre))
    dist_a = sum(float((p.detach() - q).square().sum()) for p, q in zip(model_a.parameters(), pre))
    assert dist_r < 0.8 * dist_a


def _two_params(grad_value: float = 0.5):
    """``a`` is pulled and gets a zero gradient; ``b`` has no pre tensor and a constant gradient, so s is known."""
    a = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    b = nn.Parameter(torch.zeros(6))
    pre_a = torch.tensor([0.0, -1.0, 0.5, 2.0])
    g_b = torch.full((6,), grad_value)
    return a, b, pre_a, g_b


def _expected_s(g_b: torch.Tensor, n_total: int, beta2: float, step: int) -> float:
    # Constant gradient g: v_t = (1 − β2^t)·g², so v̂ = g² exactly; a's v̂ is 0.
    v_hat_b = (1 - beta2) * sum(beta2**k for k in range(step)) * g_b.double().square() / (1 - beta2**step)
    return math.sqrt(float(v_hat_b.sum()) / n_total)


def test_l2_pull_shrinks_the_delta_geometrically_at_the_predicted_rate():
    a, b, pre_a, g_b = _two_params()
    lr, lam, beta2 = 1e-2, 3.0, 0.999
    opt = AdamR([a, b], [pre_a, None], lr=lr, weight_decay=lam, betas=(0.9, beta2))
    delta = (a.detach() - pre_a).double()
    for step in range(1, 16):
        a.grad, b.grad = torch.zeros(4), g_b.clone()
        opt.step()
        s = _expected_s(g_b, 10, beta2, step)
        delta = delta * (1 - lam * lr / s)
        torch.testing.assert_close((a.detach() - pre_a).double(), delta, rtol=1e-5, atol=1e-7)
    assert float((a.detach() - pre_a).abs().max()) < 0.31  # it really shrank: s ≈ 0.39, factor ≈ 0.92 per step


def test_l2_pull_with_all_gradients_zero_uses_s_equal_one():
    a, _, pre_a, _ = _two_params()
    opt = AdamR([a], [pre_a], lr=0.1, weight_decay=2.0)
    delta0 = a.detach() - pre_a
    for _ in range(5):
        a.grad = torch.zeros(4)
        opt.step()
    torch.testing.assert_close(a.detach() - pre_a, delta0 * (1 - 0.2) ** 5)


def test_l1_pull_moves_by_a_constant_step_in_the_sign_direction():
    a, b, pre_a, g_b = _two_params()
    lr, lam, beta2 = 1e-2, 0.5, 0.999
    opt = AdamR([a, b], [pre_a, None], lr=lr, weight_decay=lam, betas=(0.9, beta2), l1=True)
    start = a.detach().clone()
    sign = torch.sign(start - pre_a)  # element 2 has a zero delta: sign 0, it never moves
    travelled = 0.0
    for step in range(1, 11):
        a.grad, b.grad = torch.zeros(4), g_b.clone()
        opt.step()
        travelled += lam * lr / _expected_s(g_b, 10, beta2, step)
        torch.testing.assert_close(a.detach(), start - travelled * sign, rtol=0, atol=1e-6)
    assert travelled < 1.0  # no element has crossed θ_pre yet, so the step stayed constant in sign


def test_params_without_pre_tensor_behave_as_adam():
    torch.manual_seed(3)
    a_r, b_r = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7))
    b_a = nn.Parameter(b_r.detach().clone())
    opt_r = AdamR([a_r, b_r], [torch.zeros(5), None], lr=1e-2, weight_decay=10.0)
    opt_a = torch.optim.Adam([b_a], lr=1e-2, foreach=False)
    for step in range(20):
        target = torch.full((7,), float(step % 3))
        for b, opt in ((b_r, opt_r), (b_a, opt_a)):
            opt.zero_grad()
            loss = (b - target).square().sum()
            if b is b_r:
                loss = loss + (a_r - 1.0).square().sum()  # a's loss is separate: b's gradients are the same
            loss.backward()
            opt.step()
    torch.testing.assert_close(b_r, b_a)
    assert not torch.allclose(a_r, torch.ones(5), atol=0.05)  # a is pulled toward 0 against its loss


def test_pre_tensor_is_copied_once_to_the_parameter_dtype():
    a = nn.Parameter(torch.ones(3))
    pre = torch.zeros(3, dtype=torch.float64)
    opt = AdamR([a], [pre])
    stored = opt.state[a]["pre"]
    assert stored.dtype == torch.float32 and stored.data_ptr() != pre.data_ptr()
    pre.fill_(5.0)  # later changes to the caller's tensor do not leak in
    assert float(stored.sum()) == 0.0


def test_state_dict_round_trip_continues_identically():
    model_a = _mlp()
    pre = _pre_of(model_a)
    opt_a = AdamR(model_a.parameters(), pre, lr=1e-2, weight_decay=0.5)
    _train(model_a, opt_a, range(5))
    saved_model = copy.deepcopy(model_a.state_dict())
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    _train(model_a, opt_a, range(5, 12))

    model_b = _mlp(seed=7)
    model_b.load_state_dict(saved_model)
    opt_b = AdamR(model_b.parameters(), [torch.full_like(p, 9.0) for p in pre], lr=1e-2, weight_decay=0.5)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer))  # restores the pre tensors too
    _train(model_b, opt_b, range(5, 12))
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=0, atol=0)


def test_param_groups_with_own_hyperparameters_pair_pre_tensors_in_order():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = AdamR([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], [torch.zeros(2), torch.zeros(3)],
                lr=0.1, weight_decay=1.0)
    a.grad, b.grad = torch.zeros(2), torch.zeros(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((2,), 0.9))  # pulled: 1 − 1.0·0.1/1
    torch.testing.assert_close(b.detach(), torch.ones(3))  # its group has λ = 0


def test_adamr_param_groups_pairs_by_name_and_excludes_the_head():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)
            self.extra = nn.Linear(4, 1)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

    net = Net()
    base = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("extra")}
    params, pre = adamr_param_groups(net, base)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names == ["encoder.weight", "encoder.bias", "classifier.weight", "classifier.bias", "extra.weight",
                     "extra.bias"]
    assert [p is q for p, q in zip(params, [dict(net.named_parameters())[n] for n in names])] == [True] * 6
    assert pre[0] is base["encoder.weight"] and pre[1] is base["encoder.bias"]
    assert pre[2:] == [None, None, None, None]  # head excluded, extra missing from the base
    _, pre_all = adamr_param_groups(net, base, exclude=None)
    assert pre_all[2] is base["classifier.weight"]
    AdamR(params, pre)  # the pairing is accepted as is


def test_adamr_param_groups_rejects_shape_mismatch_naming_the_tensor():
    net = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 4\) but the parameter has shape \(2, 4\)"):
        adamr_param_groups(net, {"weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        adamr_param_groups(net, {}, exclude="(")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"eps": -1.0}, "eps=-1.0"),
        ({"betas": (0.9, 1.0)}, "betas="),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamR([nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_pre_params_raise():
    a, b = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"pre_params\[1\] has shape \(5,\) but parameter 1 has shape \(4,\)"):
        AdamR([a, b], [torch.zeros(2, 3), torch.zeros(5)])
    with pytest.raises(ValueError, match="pre_params has 1 entries but there are 2 parameters"):
        AdamR([a, b], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"pre_params\[0\] is a list"):
        AdamR([a, b], [[0.0], None])


def test_family_recipe_accepts_adamr_strength_but_not_for_adamw():
    from deltakit.families import Recipe

    assert Recipe(learning_rate=5e-5, steps=10, optimizer="adamr", weight_decay=5.0).weight_decay == 5.0
    with pytest.raises(ValueError, match="weight_decay"):
        Recipe(learning_rate=5e-5, steps=10, weight_decay=5.0)
    with pytest.raises(ValueError, match="optimizer"):
        Recipe(learning_rate=5e-5, steps=10, optimizer="sgd")
