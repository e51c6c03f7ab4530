"""Registry entries with a prepare step (the DAREx-q searches and WANDA) on the tiny family: what they choose, that
they search once per rate, and that their search masks never use the evaluation seeds."""

from __future__ import annotations

import json

import pytest
import torch

from deltakit.methods import get_method, sweep_methods
from deltakit.resident import ResidentModel
from deltakit.sources import resolve
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import SweepContext, sweep

BASE, FT = "family:tiny/base", "family:tiny/sentiment3-hot"


class Counting:
    """Accuracy-like score from one weight, counting calls (each search evaluation is one call)."""

    fingerprint = "counting-search-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        w = model.bert.encoder.layer[0].attention.self.query.weight
        return {"accuracy": float(w.detach().abs().mean())}


@pytest.fixture(scope="module")
def context(tiny_home, request) -> SweepContext:
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("DELTAKIT_HOME", str(tiny_home))
    request.addfinalizer(monkeypatch.undo)
    rm = ResidentModel(resolve(BASE), resolve(FT))
    texts = ["great day", "awful service, never again", "it is fine I guess", "love it!!"] * 4
    return SweepContext(rm, lambda: Counting(), lambda: texts)


@pytest.mark.parametrize("name", ["darex_q_labelled", "darex_q_unlabelled", "darex_q_analytic"])
def test_search_chooses_an_admissible_q_once_per_rate(context, name):
    info = get_method(name)
    assert info.applies_as == "darex_q" and name in sweep_methods()
    first = info.prepare(context, rate=0.9, seed=0)
    again = info.prepare(context, rate=0.9, seed=1)  # another evaluation seed: the memoised search is reused
    assert again is first
    assert 0.1 - 1e-9 <= first.q <= 1.0
    qs = [first.params_for(t.name)["q"] for t in context.targets] if first.params_for else [first.params["q"]]
    assert all(0.1 - 1e-9 <= q <= 1.0 for q in qs)
    assert first.record["evaluations"] > 0


def test_unlabelled_search_masks_are_disjoint_from_evaluation_seeds(context):
    chosen = get_method("darex_q_unlabelled").prepare(context, rate=0.5, seed=0, n_seeds=3)
    assert chosen.record["search_seeds"] == [12345, 12346, 12347]
    other = get_method("darex_q_unlabelled").prepare(context, rate=0.5, seed=0, n_seeds=2, search_seed=100)
    assert other.record["search_seeds"] == [100, 101]
    with pytest.raises(ValueError, match="n_seeds must be an integer >= 1"):
        get_method("darex_q_unlabelled").prepare(context, rate=0.5, seed=0, n_seeds=0)


@pytest.mark.parametrize("rate, q", [(0.0, 1.0), (1.0, 1.0)])
def test_no_search_at_the_end_rates(context, rate, q):
    for name in ("darex_q_labelled", "darex_q_unlabelled"):
        chosen = get_method(name).prepare(context, rate=rate, seed=0)
        assert chosen.q == q and chosen.record["evaluations"] == 0


def test_every_registry_entry_makes_a_valid_spec():
    """A spec accepts every entry at every rate: inputs a prepare step supplies are not asked of the user."""
    spec = SweepSpec(BASE, FT, methods=[m for m in sweep_methods() if m != "darex_q"] + ["darex_q:q=1.0"],
                     rates=[0.0, 0.3, 0.9, 1.0])
    assert {m.name for m, _, _ in spec.points()} >= {"wanda", "darex_q_labelled", "finetuned", "base"}


def test_wanda_prepare_gives_activation_norms_per_linear_weight(context):
    prepared = get_method("wanda").prepare(context, rate=0.5, seed=0)
    shapes = {t.name: t.ft.shape for t in context.targets}
    linear = next(n for n in shapes if n.endswith("attention.self.query.weight"))
    norms = prepared.params_for(linear)["act_norms"]
    assert norms.shape == (shapes[linear][1],) and bool((norms > 0).all())
    embedding = next(n for n in shapes if "word_embeddings" in n)
    assert torch.equal(prepared.params_for(embedding)["act_norms"], torch.ones(shapes[embedding][1]))
    bias = next(n for n in shapes if len(shapes[n]) == 1)
    assert prepared.params_for(bias) == {}


def test_sweep_records_what_the_search_chose(tiny, tmp_path):
    spec = SweepSpec(BASE, FT, methods=["darex_q_labelled:search_seed=7"], rates=[0.9], seeds=[0, 1],
                     references=False)
    ev = Counting()
    df = sweep(spec, RunOptions(progress=False), evaluator=ev, search_evaluator=Counting())
    assert set(df["status"]) == {"ok"} and df["seed"].tolist() == [0, 1]
    record = json.loads(df["params"].iloc[0])
    assert record["search_seed"] == 7 and record["q"] == pytest.approx(df["q"].iloc[0])
    assert ev.calls == 2  # the test evaluator ran once per point; the search used its own evaluator
