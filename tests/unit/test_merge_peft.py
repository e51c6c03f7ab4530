"""deltakit's merge methods against PEFT's ``peft/utils/merge_utils.py`` on the same tensors (PEFT: test-only).

Compared: ``ta`` with ``task_arithmetic``, ``ties`` with ``ties(..., majority_sign_method="total")``, ``dare_ta``
with ``dare_linear`` and ``dare_ties`` with ``dare_ties`` (DARE: Yu et al. 2024, arXiv:2311.03099; TIES: Yadav et
al. 2023, arXiv:2306.01708; task arithmetic: Ilharco et al. 2023, arXiv:2212.04089). deltakit's ``rate`` is the
fraction dropped; PEFT's ``density`` is ``1 - rate``; deltakit's one ``lam`` is PEFT's ``weights = [lam] * K``.

Tolerance ("to fp32 rounding"). The two libraries do the same operations in a different order (PEFT weights each
fine-tune, then sums / averages; deltakit sums / averages, then multiplies by ``lam``; PEFT divides by ``density``,
deltakit multiplies by ``float32(1 / (1 - rate))``). Every fp32 rounding errs by at most ``eps / 2`` times the
magnitude of its result, and every intermediate here is bounded by ``M = |lam| * scale * sum_k |delta_k|`` (element
by element), so with at most 8K roundings on the two sides together the two results differ by at most
``4 K eps M`` per element (``eps = 2**-23``). The tests assert exactly that element-wise bound (0 where M is 0).

Definition differences found in PEFT 0.21's source (each one exercised by a test below):

1. Kept count of the magnitude trim: PEFT keeps ``int(density * numel)`` entries (``torch.topk``); deltakit's
   threshold is the ``int((1 - rate) * n)``-th largest ``|delta|`` -- the same count, since ``density = 1 - rate``
   is the same float expression.
2. Ties at the trim threshold: PEFT's ``topk`` keeps exactly that many entries, choosing among equal magnitudes in
   an implementation-defined order; deltakit keeps *every* entry with ``|delta| >=`` the threshold, so with ties
   at the threshold it keeps more entries than PEFT (deterministically, independent of storage order). On tensors
   without ties in ``|delta|`` the two agree.
3. Order of weighting and sign election: PEFT 0.21 elects the sign from the *unweighted* trimmed tensors and
   applies the weights afterwards (``calculate_majority_sign_mask`` runs before ``weighted_task_tensors``), like
   deltakit, which elects from ``P + N`` and multiplies the disjoint mean by ``lam`` at the end. (PEFT's weights can
   differ per fine-tune; deltakit has one ``lam``, so only equal weights are comparable.) With equal weights the
   results agree for negative ``lam`` too.
4. How the total mass is summed: PEFT sums the K trimmed values in order (``tensor.sum(dim=0)``); deltakit adds
   the sum of the positives ``P`` to the sum of the negatives ``N``. In exact arithmetic these are equal; in fp32
   their signs can differ only where the total is within rounding of zero, where the elected sign is then a
   coin-flip of rounding. The random tests exclude entries whose fp64 total is within ``4 K eps M`` of zero (and
   assert there are few of them).
5. Sign at zero total mass: both elect ``+`` (PEFT ``where(sum >= 0, 1, -1)``, deltakit ``P + N >= 0``), so an
   entry whose kept values cancel exactly takes the mean of its positive values in both.
6. Entries no fine-tune agrees with: only possible when every kept value is 0 (the elected sign is the sign of a
   nonzero total, so some value has it); both give 0 (PEFT ``clamp(count, min=1)``, deltakit ``max(NP, 1)``).
7. Sign election method: PEFT also offers ``majority_sign_method="frequency"``; deltakit implements only
   ``"total"`` (mass), the TIES paper's rule.
8. The DARE mask: PEFT draws ``torch.bernoulli(full_like(delta, density))`` from torch's global generator (one call
   per fine-tune, in list order), so it depends on the generator's state and device; deltakit keeps entry ``i`` of
   fine-tune ``k`` iff ``u(finetune_key(seed, name, k), i) >= float32(rate)`` (counter-based Philox). With PEFT's
   ``torch.bernoulli`` replaced by deltakit's masks the results agree to fp32 rounding.
9. DARE rescale: PEFT divides by ``density``; deltakit multiplies by ``float32(1 / (1 - rate))`` (rounding only).
10. Edge densities: at density >= 1 PEFT's ``prune`` returns the tensor unpruned with a warning (deltakit at rate
    0 keeps everything too: the same result). At density 0 PEFT's DARE divides ``0 / 0`` and returns NaN
    everywhere; deltakit at rate 1 drops everything, skips the rescale and returns zeros.
"""

from __future__ import annotations

import warnings

import pytest

from deltakit import masks  # before torch and peft (deltakit sets the OpenMP wait policy)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from deltakit.methods import get_method  # noqa: E402
from deltakit.methods.merging import get_merge  # noqa: E402

pytest.importorskip("peft")
from peft.utils import merge_utils as peft_merge  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps  # 2**-23
SHAPES = [(384,), (48, 96), (7, 5, 33)]
LAMS = [1.0, 0.3, -0.7]
RATES = [0.1, 0.5, 0.9]
NAME = "bert.encoder.layer.0.attention.self.query.weight"
SEED = 11


def make_deltas(shape: tuple[int, ...], k: int, seed: int) -> list[torch.Tensor]:
    """K random fp32 deltas, normal(0, 1e-3), without ties in |delta| within any one delta.

    fp32 normals do collide (birthday: a few thousand draws near 1e-3 share a value now and then), so entries whose
    magnitude repeats are redrawn until every ``|delta|`` of a delta is distinct.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        d = (torch.randn(shape, generator=g, dtype=torch.float32) * 1e-3).reshape(-1)  # (n,)
        while True:
            _, inverse, counts = d.abs().unique(return_inverse=True, return_counts=True)
            repeated = counts[inverse] > 1  # (n,) every entry whose |value| occurs twice or more
            if not repeated.any():
                break
            d[repeated] = torch.randn(int(repeated.sum()), generator=g) * 1e-3
        out.append(d.reshape(shape))
    return out


def bound(deltas: list[torch.Tensor], lam: float, scale: float = 1.0) -> torch.Tensor:
    """The element-wise tolerance 4 K eps M, M = |lam| * scale * sum_k |delta_k| (module docstring)."""
    m = abs(lam) * scale * torch.stack([d.abs() for d in deltas]).sum(0)  # (*shape)
    return 4 * len(deltas) * EPS32 * m


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: torch.Tensor, where: torch.Tensor | None = None):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    ok = (ours - theirs).abs() <= tol
    if where is not None:
        ok |= ~where
    bad = (~ok).nonzero()
    assert bad.numel() == 0, (f"{bad.shape[0]} entries differ beyond fp32 rounding, first at {bad[0].tolist()}: "
                              f"deltakit {ours[tuple(bad[0])]!r}, PEFT {theirs[tuple(bad[0])]!r}")


def decided(kept: list[torch.Tensor]) -> torch.Tensor:
    """Entries whose elected sign does not hinge on rounding (difference 4).

    Those whose fp64 total of the kept values is farther from zero than the rounding bound of the kept values, and
    those where nothing is kept (both elect '+' and give 0).
    """
    tol = bound(kept, 1.0).double()
    total = torch.stack([t.double() for t in kept]).sum(0)
    return (total.abs() > tol) | (tol == 0)


def trimmed(d: torch.Tensor, rate: float) -> torch.Tensor:
    """deltakit's trim of one delta (every entry >= the int((1 - rate) * n)-th largest |delta| kept), for checks."""
    k = int((1.0 - rate) * d.numel())
    if k == 0:
        return torch.zeros_like(d)
    threshold = torch.kthvalue(d.abs().reshape(-1), d.numel() - k + 1).values
    return torch.where(d.abs() >= threshold, d, torch.zeros_like(d))


def dare_masks(shape: tuple[int, ...], k: int, rate: float) -> list[torch.Tensor]:
    """deltakit's keep masks of fine-tunes 0..K-1 of tensor NAME (u >= float32(rate)), as 0/1 float32."""
    n = int(np.prod(shape))
    return [(masks.uniform(masks.finetune_key(SEED, NAME, i), n) >= masks.check_rate(rate))
            .float().reshape(shape) for i in range(k)]


@pytest.fixture
def peft_with_masks(monkeypatch):
    """Make PEFT's ``random_pruning`` draw deltakit's masks: ``torch.bernoulli`` returns them in call order."""

    def install(mask_list: list[torch.Tensor], density: float) -> list[torch.Tensor]:
        queue = list(mask_list)

        def fake_bernoulli(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            assert not args and not kwargs, "PEFT's random_pruning calls torch.bernoulli(probabilities) only"
            assert queue, "PEFT drew more masks than there are fine-tunes"
            mask = queue.pop(0)
            assert p.shape == mask.shape and torch.all(p == torch.tensor(density, dtype=p.dtype))
            return mask.to(p.dtype)

        monkeypatch.setattr(peft_merge.torch, "bernoulli", fake_bernoulli)
        return queue

    return install


# ----------------------------------------------------------------------------------------------------------------
# Task arithmetic and TIES
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("lam", LAMS)
def test_ta_equals_peft_task_arithmetic(shape, k, lam):
    deltas = make_deltas(shape, k, seed=k * 100 + len(shape))
    ours = get_merge("ta").fn(deltas, rate=0.0, seed=SEED, name=NAME, lam=lam)
    theirs = peft_merge.task_arithmetic(deltas, weights=torch.tensor([lam] * k))
    assert_close(ours, theirs, bound(deltas, lam))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("rate", RATES)
def test_ties_equals_peft_ties(shape, k, lam, rate):
    deltas = make_deltas(shape, k, seed=k * 1000 + len(shape) + int(rate * 10))
    ours = get_merge("ties").fn(deltas, rate=rate, seed=SEED, name=NAME, lam=lam)
    theirs = peft_merge.ties(deltas, weights=torch.tensor([lam] * k), density=1.0 - rate,
                             majority_sign_method="total")
    tol = bound(deltas, lam)
    kept = [trimmed(d, rate) for d in deltas]
    sure = decided(kept)
    assert (~sure).sum() <= 1 + deltas[0].numel() // 1000  # difference 4 is rare
    assert_close(ours, theirs, tol, where=sure)
    nothing_kept = torch.stack([t == 0 for t in kept]).all(0)
    assert torch.all(ours[nothing_kept] == 0) and torch.all(theirs[nothing_kept] == 0)  # difference 6


def test_ties_rate_zero_keeps_everything_like_peft_density_one():
    deltas = make_deltas((48, 96), 3, seed=5)
    ours = get_merge("ties").fn(deltas, rate=0.0, seed=SEED, name=NAME, lam=0.5)
    with pytest.warns(UserWarning, match="no pruning"):  # difference 10: PEFT skips the trim at density >= 1
        theirs = peft_merge.ties(deltas, weights=torch.tensor([0.5] * 3), density=1.0, majority_sign_method="total")
    assert_close(ours, theirs, bound(deltas, 0.5), where=decided(deltas))


@pytest.mark.parametrize("lam", [1.0, -0.7])
def test_ties_sign_at_zero_total_mass_is_plus_in_both(lam):
    """Difference 5: kept values that cancel exactly elect '+', and the mean of the positive ones is taken."""
    d0 = make_deltas((64, 32), 1, seed=9)[0]
    deltas = [d0, -d0, 0.5 * d0]  # total mass d0 * (1 - 1 + 0.5); in 2 of 3 columns the third is zeroed below
    deltas[2][:, :21] = 0.0
    ours = get_merge("ties").fn(deltas, rate=0.0, seed=SEED, name=NAME, lam=lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # density 1: "no pruning will be performed"
        theirs = peft_merge.ties(deltas, weights=torch.tensor([lam] * 3), density=1.0, majority_sign_method="total")
    zero_mass = torch.zeros_like(d0, dtype=torch.bool)
    zero_mass[:, :21] = True
    expected = lam * d0.abs()  # the one positive value among {d0, -d0}, whichever it is
    assert torch.equal(ours[zero_mass], expected[zero_mass])
    assert torch.equal(theirs[zero_mass], expected[zero_mass])
    assert_close(ours, theirs, bound(deltas, lam))


@pytest.mark.parametrize("rate", [0.5, 0.75])
def test_ties_with_ties_at_the_threshold_deltakit_keeps_more(rate):
    """Difference 2: with equal |delta| at the threshold deltakit keeps all of them, PEFT's topk exactly k."""
    g = torch.Generator().manual_seed(3)
    n = 1000
    d = torch.randn(n, generator=g) * 1e-3
    d = d.abs() + 1e-3  # all distinct, in (1e-3, ...)
    order = torch.argsort(d)
    k = int((1.0 - rate) * n)  # the count both libraries aim for
    # 40 entries straddling the k-th largest get one magnitude (random signs): a tie at the threshold.
    tied = order[n - k - 20: n - k + 20]
    d[tied] = d[order[n - k]].item()
    d = d * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    threshold = d.abs()[order[n - k]]
    ours = get_merge("ties").fn([d], rate=rate, seed=SEED, name=NAME, lam=1.0)
    theirs = peft_merge.ties([d], weights=torch.tensor([1.0]), density=1.0 - rate, majority_sign_method="total")
    ours_kept, theirs_kept = ours != 0, theirs != 0
    assert int(theirs_kept.sum()) == k  # PEFT: exactly int(density * numel)
    assert int(ours_kept.sum()) == int((d.abs() >= threshold).sum()) == k + 20  # deltakit: every tied entry
    assert torch.all(ours_kept[theirs_kept])  # PEFT's kept set is a subset of deltakit's
    above = d.abs() > threshold
    assert torch.all(ours_kept[above]) and torch.all(theirs_kept[above])  # strictly above: both keep
    assert torch.equal(ours[theirs_kept], theirs[theirs_kept])  # K = 1, lam = 1: the kept values themselves


# ----------------------------------------------------------------------------------------------------------------
# DARE + TA / TIES with deltakit's masks inside PEFT
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("rate", RATES)
def test_dare_ta_equals_peft_dare_linear_with_deltakit_masks(peft_with_masks, shape, k, lam, rate):
    deltas = make_deltas(shape, k, seed=k * 7 + len(shape))
    ours = get_merge("dare_ta").fn(deltas, rate=rate, seed=SEED, name=NAME, lam=lam)
    left = peft_with_masks(dare_masks(shape, k, rate), 1.0 - rate)
    theirs = peft_merge.dare_linear(deltas, weights=torch.tensor([lam] * k), density=1.0 - rate)
    assert not left, "PEFT drew fewer masks than there are fine-tunes"
    assert_close(ours, theirs, bound(deltas, lam, scale=1.0 / (1.0 - rate)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("rate", RATES)
def test_dare_ties_equals_peft_dare_ties_with_deltakit_masks(peft_with_masks, shape, k, lam, rate):
    deltas = make_deltas(shape, k, seed=k * 13 + len(shape))
    ours = get_merge("dare_ties").fn(deltas, rate=rate, seed=SEED, name=NAME, lam=lam)
    mask_list = dare_masks(shape, k, rate)
    left = peft_with_masks(mask_list, 1.0 - rate)
    theirs = peft_merge.dare_ties(deltas, weights=torch.tensor([lam] * k), density=1.0 - rate,
                                  majority_sign_method="total")
    assert not left, "PEFT drew fewer masks than there are fine-tunes"
    scale = 1.0 / (1.0 - rate)
    kept = [d * m * scale for d, m in zip(deltas, mask_list)]
    sure = decided(kept)
    assert (~sure).sum() <= 1 + deltas[0].numel() // 1000
    assert_close(ours, theirs, bound(deltas, lam, scale), where=sure)


def test_dare_masks_differ_from_peft_global_generator():
    """Difference 8, the reason for the monkeypatch: PEFT's own mask comes from torch's global generator."""
    deltas = make_deltas((48, 96), 2, seed=4)
    ours = get_merge("dare_ta").fn(deltas, rate=0.5, seed=SEED, name=NAME, lam=1.0)
    torch.manual_seed(SEED)
    theirs = peft_merge.dare_linear(deltas, weights=torch.tensor([1.0, 1.0]), density=0.5)
    assert not torch.allclose(ours, theirs)
    again = get_merge("dare_ta").fn(deltas, rate=0.5, seed=SEED, name=NAME, lam=1.0)
    assert torch.equal(ours, again)  # deltakit: a pure function of (seed, name, position)


def test_dare_at_rate_one_is_zero_where_peft_density_zero_is_nan():
    """Difference 10: PEFT's rescale divides 0 by density 0; deltakit drops everything and returns zeros."""
    deltas = make_deltas((48, 96), 2, seed=8)
    for method, peft_fn in (("dare_ta", peft_merge.dare_linear), ("dare_ties", peft_merge.dare_ties)):
        ours = get_merge(method).fn(deltas, rate=1.0, seed=SEED, name=NAME, lam=1.0)
        assert torch.equal(ours, torch.zeros_like(ours))
        theirs = peft_fn(deltas, weights=torch.tensor([1.0, 1.0]), density=0.0)
        assert torch.isnan(theirs).all()


# ----------------------------------------------------------------------------------------------------------------
# K = 1: DARE + TA is DARE
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rate", [0.0, *RATES, 1.0])
def test_dare_ta_of_one_finetune_is_dare_bit_for_bit(shape, rate):
    """Fine-tune 0 uses DARE's own key (masks.finetune_key(seed, name, 0) == masks.tensor_key(seed, name))."""
    delta = make_deltas(shape, 1, seed=21 + len(shape))[0]
    merged = get_merge("dare_ta").fn([delta], rate=rate, seed=SEED, name=NAME, lam=1.0)
    single = get_method("dare").fn(delta, rate=rate, seed=SEED, name=NAME)
    assert merged.dtype == single.dtype == torch.float32
    assert torch.equal(merged.view(torch.int32), single.view(torch.int32))  # bit patterns: -0.0 != 0.0 here
