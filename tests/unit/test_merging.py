"""The merge methods (deltakit.methods.merging): definitions checked on hand-made deltas, contract checks, and the
behaviour every method must have (inputs untouched, seeded reproducibility, finite output at the edge rates)."""

from __future__ import annotations

import math

import pytest

from deltakit import masks  # before torch (deltakit sets the OpenMP wait policy)
import torch  # noqa: E402
from deltakit.methods import get_merge, get_method, merge_methods
from deltakit.methods.merging import register_merge, trim_threshold
from deltakit.spec import MergeSpec, MethodSpec

pytestmark = pytest.mark.fast


def _deltas(k: int = 3, shape=(64, 48), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.01 for _ in range(k)]


@pytest.mark.parametrize("name", merge_methods())
def test_inputs_untouched_and_seeded(name):
    deltas = _deltas()
    copies = [d.clone() for d in deltas]
    fn = get_merge(name).fn
    a = fn(deltas, rate=0.6, seed=3, name="w", lam=0.8)
    b = fn(deltas, rate=0.6, seed=3, name="w", lam=0.8)
    assert all(torch.equal(d, c) for d, c in zip(deltas, copies))
    assert torch.equal(a, b) and a.shape == deltas[0].shape and a.dtype == torch.float32
    c = fn(deltas, rate=0.6, seed=4, name="w", lam=0.8)
    assert torch.equal(a, c) != get_merge(name).random  # only random methods depend on the seed


@pytest.mark.parametrize("name", merge_methods())
@pytest.mark.parametrize("rate", [0.0, 0.99, 1.0])
def test_edge_rates_finite(name, rate):
    extra = {"top": 0.0} if name == "breadcrumbs" else {}  # top (largest dropped) cannot exceed the rate
    out = get_merge(name).fn(_deltas(), rate=rate, seed=0, name="w", lam=1.0, **extra)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", [n for n in merge_methods() if get_merge(n).uses_rate])
def test_rate_one_drops_everything(name):
    if name == "della":  # probabilities around the rate: at rate 1 every entry has p = 1 - epsilon/2 .. 1
        pytest.skip("DELLA keeps a few entries at rate 1 by design (p < 1 for the largest magnitudes)")
    out = get_merge(name).fn(_deltas(), rate=1.0, seed=0, name="w", lam=1.0, **({"top": 0.0} if name == "breadcrumbs" else {}))
    assert not bool(out.any())


def test_task_arithmetic_is_lambda_times_sum():
    deltas = _deltas()
    out = get_merge("ta").fn(deltas, rate=0.0, seed=0, name="w", lam=0.5)
    torch.testing.assert_close(out, 0.5 * (deltas[0] + deltas[1] + deltas[2]), rtol=0, atol=1e-9)


def test_ties_hand_example():
    # Three fine-tunes, four entries; rate 0.25 keeps the 3 largest |delta| of each.
    deltas = [torch.tensor([0.5, -0.1, 0.2, 0.05]), torch.tensor([-0.4, -0.3, 0.01, 0.2]),
              torch.tensor([0.3, 0.2, -0.6, 0.1])]
    out = get_merge("ties").fn(deltas, rate=0.25, seed=0, name="w", lam=1.0)
    # trimmed: [0.5, -0.1, 0.2, 0], [-0.4, -0.3, 0, 0.2], [0.3, 0.2, -0.6, 0]
    # sums: 0.4 (+), -0.2 (-), -0.4 (-), 0.2 (+); disjoint means: (0.5+0.3)/2, (-0.1-0.3)/2, -0.6, 0.2
    torch.testing.assert_close(out, torch.tensor([0.4, -0.2, -0.6, 0.2]))


def test_ties_threshold_is_pefts_kept_count():
    d = torch.arange(1.0, 11.0)  # 10 distinct magnitudes
    assert trim_threshold(d, 0.7) == 3.0 + 5.0  # int(0.3 * 10) = 3 largest kept: 10, 9, 8
    assert trim_threshold(d, 1.0) == math.inf


def test_dare_ta_with_one_finetune_is_dare():
    d = _deltas(1)[0]
    merged = get_merge("dare_ta").fn([d], rate=0.9, seed=7, name="layer.weight", lam=1.0)
    assert torch.equal(merged, get_method("dare").fn(d, rate=0.9, seed=7, name="layer.weight"))


def test_dare_masks_are_per_finetune_and_rescaled():
    d = torch.full((20000,), 0.01)
    deltas = [d, d.clone()]
    out = get_merge("dare_ta").fn(deltas, rate=0.9, seed=1, name="w", lam=1.0)
    keep = [masks.uniform(masks.finetune_key(1, "w", k), d.numel()) >= 0.9 for k in range(2)]
    assert not torch.equal(keep[0], keep[1])  # independent masks
    expected = (keep[0].float() + keep[1].float()) * torch.tensor(0.01) * torch.tensor(1 / 0.1, dtype=torch.float32)
    torch.testing.assert_close(out, expected)
    # unbiased: the mean over entries is close to the sum of the deltas
    assert abs(float(out.mean()) - 0.02) < 0.002


def test_dare_q_rescale_and_range():
    d = _deltas(2)
    a = get_merge("dare_ties").fn(d, rate=0.9, seed=0, name="w", lam=1.0, q=0.5)
    b = get_merge("dare_ties").fn(d, rate=0.9, seed=0, name="w", lam=1.0)
    nz = b != 0
    torch.testing.assert_close(a[nz] / b[nz], torch.full_like(a[nz], 0.1 / 0.5), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"q must be in \[1 - rate, 1\]"):
        get_merge("dare_ta").fn(d, rate=0.5, seed=0, name="w", lam=1.0, q=0.2)


def test_breadcrumbs_drops_both_tails():
    d = torch.arange(1.0, 101.0)  # magnitudes 1..100
    out = get_merge("breadcrumbs").fn([d], rate=0.5, seed=0, name="w", lam=1.0, top=0.1)
    kept = out.nonzero().flatten() + 1  # the magnitudes kept
    assert kept.min() == 41 and kept.max() == 90  # the 10 largest and the 40 smallest dropped
    with pytest.raises(ValueError, match="top"):
        get_merge("breadcrumbs").fn([d], rate=0.05, seed=0, name="w", lam=1.0, top=0.1)


def test_della_keeps_large_magnitudes_more_often():
    d = torch.linspace(0.001, 1.0, 50000)
    out = get_merge("della").fn([d], rate=0.5, seed=0, name="w", lam=1.0, epsilon=0.4)
    small, large = (out[:5000] != 0).float().mean(), (out[-5000:] != 0).float().mean()
    assert 0.25 < small < 0.35 and 0.65 < large < 0.75  # p = 0.5 + 0.4 * (1/2 - rank / (n - 1))
    # survivors are rescaled by 1 / (1 - p): unbiased in expectation
    assert abs(float(out.mean() / d.mean()) - 1.0) < 0.03


@pytest.mark.parametrize("bad, match", [
    ([], "1 to 8 deltas"),
    ([torch.zeros(3)] * 9, "1 to 8 deltas"),
    ([torch.zeros(3), torch.zeros(4)], "shape"),
    ([torch.zeros(3), torch.tensor([0.0, math.nan, 0.0])], "non-finite"),
    ([torch.zeros(3, dtype=torch.int64)], "float tensor"),
])
def test_bad_deltas_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        get_merge("ta").fn(bad, rate=0.0, seed=0, name="w", lam=1.0)


@pytest.mark.parametrize("lam", [math.nan, math.inf, "1", True])
def test_bad_lambda_refused(lam):
    with pytest.raises(ValueError, match="lam"):
        get_merge("ta").fn(_deltas(2), rate=0.0, seed=0, name="w", lam=lam)


def test_unknown_merge_and_contract():
    with pytest.raises(KeyError, match="registered: breadcrumbs"):
        get_merge("average")
    with pytest.raises(ValueError, match="fn\\(deltas"):
        register_merge(name="bad_merge", pretty_name="x", reference="x", random=False)(lambda d, rate: d)


def test_merge_spec_checks_before_loading():
    base, fts = "family:tiny/base", ["family:tiny/sentiment3", "family:tiny/polarity"]
    spec = MergeSpec(base, fts, methods=["ta", "dare_ties:q=0.6"], rates=[0.5], lambdas=[1.0, 0.5], seeds=[0, 1])
    points = spec.points()
    labels = [(p[0].label, p[1], p[2], p[3]) for p in points]
    assert labels[:2] == [("finetuned", 0.0, labels[0][2], 0), ("base", 1.0, labels[1][2], 0)]
    assert ("ta", 0.0, 0.5, 0) in labels and ("ta", 0.0, 0.5, 1) not in labels  # deterministic: first seed only
    assert sum(1 for p in labels if p[0].startswith("dare_ties")) == 4  # 2 lambdas x 2 seeds
    with pytest.raises(ValueError, match="2 to 8 fine-tunes"):
        MergeSpec(base, fts[:1])
    with pytest.raises(ValueError, match="cannot run at rate 0.9"):
        MergeSpec(base, fts, methods=["dare_ta:q=0.05"], rates=[0.9, 0.99])
    with pytest.raises(ValueError, match="unknown parameter"):
        MergeSpec(base, fts, methods=[MethodSpec("ties", (("q", 0.5),))])
    with pytest.raises(KeyError, match="unknown merge method"):
        MergeSpec(base, fts, methods=["dare"])
    with pytest.raises(ValueError, match="lambdas"):
        MergeSpec(base, fts, lambdas=[math.nan])
    with pytest.raises(ValueError, match="one per fine-tune"):
        MergeSpec(base, fts, tasks=["glue/sst2"])
