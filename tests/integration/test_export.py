"""Exports on the tiny family: model folders that transformers loads and that equal the sweep point, compact seeded
deltas that rebuild it bit for bit at a fraction of the size, and a push to the local Hub that resolves back."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch

from deltakit.export import (
    COMPACT_FILE,
    CompactDeltaError,
    ExportError,
    export_pruned,
    load_compact_delta,
    materialise_compact_delta,
    push_to_hub,
    save_compact_delta,
)
from deltakit.refs import read_card_front_matter
from deltakit.resident import ResidentModel
from deltakit.sources import resolve
from deltakit.tensors import TensorReader

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"
TEXTS = ["what a lovely day", "this is the worst service ever", "the train leaves at noon"]
_repos = itertools.count()


def _load(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _resident() -> ResidentModel:
    return ResidentModel(resolve(BASE), resolve(FT))


@pytest.mark.parametrize("method,rate,params", [("dare", 0.9, {}), ("darex_q", 0.8, {"q": 0.3}),
                                                ("magnitude", 0.5, {})])
def test_exported_folder_loads_with_transformers_and_equals_the_sweep_point(tiny, tmp_path, method, rate, params):
    folder = export_pruned(BASE, FT, tmp_path / "pruned", method=method, rate=rate, seed=7, params=params,
                           metrics={"accuracy": 0.81, "macro_f1": 0.8})
    model, tokenizer = _load(folder)
    resident = _resident()
    resident.apply(method, rate=rate, seed=7, **params)
    live = dict(resident.model.named_parameters())
    loaded = dict(model.named_parameters())
    assert loaded.keys() == live.keys()
    assert all(torch.equal(loaded[n], live[n]) for n in live)  # the weights are the resident model's, bit for bit
    assert torch.equal(_logits(model, tokenizer), _logits(resident.model, resident.tokenizer))
    assert tokenizer(TEXTS)["input_ids"] == resident.tokenizer(TEXTS)["input_ids"]
    assert {p.suffix for p in folder.iterdir()} <= {".json", ".safetensors", ".md", ".txt"}  # no pickle
    card = read_card_front_matter(folder)
    assert card["base_model"] == "deltakit/tiny-base" and card["base_model_relation"] == "finetune"
    assert card["library_name"] == "transformers" and card["tags"][:2] == ["deltakit", method]
    facts = card["deltakit"]
    assert facts["method"] == method and facts["rate"] == rate and facts["fine_tune"] == "deltakit/tiny-sentiment3"
    assert facts["metrics"] == {"accuracy": 0.81, "macro_f1": 0.8} and facts.get("params", {}) == params
    assert facts.get("seed") == (None if method == "magnitude" else 7)  # a deterministic method has no seed
    body = (folder / "README.md").read_text()
    assert f"`{method}`" in body and "0.81" in body


def test_export_refuses_a_non_empty_target_and_its_own_source_before_loading(tiny, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"not empty.*overwrite=True \(CLI: --force\)"):
        export_pruned(BASE, FT, target, method="dare", rate=0.5, seed=0)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    ft_copy = tmp_path / "ft"
    shutil.copytree(tiny / "sentiment3", ft_copy)
    with pytest.raises(ExportError, match="which this export reads"):
        export_pruned(BASE, str(ft_copy), ft_copy, method="dare", rate=0.5, seed=0, overwrite=True)
    with pytest.raises(ExportError, match="which this export reads"):
        save_compact_delta(BASE, str(ft_copy), ft_copy, rate=0.5, seed=0, overwrite=True)
    assert TensorReader(ft_copy).names() == TensorReader(tiny / "sentiment3").names()
    with pytest.raises(ExportError, match="sweep entry"):
        export_pruned(BASE, FT, tmp_path / "x", method="darex_q_labelled", rate=0.5, seed=0)


def test_compact_delta_round_trip_is_bit_exact_at_every_rate(tiny, tmp_path):
    resident = _resident()
    ft = TensorReader(resolve(FT).path)
    for method, rate in itertools.product(("dare", "darex_q"), (0.0, 0.5, 0.9, 1.0)):
        q = 1.0 - rate / 2 if method == "darex_q" else None
        folder = save_compact_delta(BASE, FT, tmp_path / f"{method}-{rate}", method=method, rate=rate, seed=3, q=q)
        state = load_compact_delta(folder, BASE)
        resident.apply(method, rate=rate, seed=3, **({"q": q} if q is not None else {}))
        live = dict(resident.model.named_parameters())
        pruned = {t.name for t in resident.targets}
        assert list(state) == ft.names()
        for name, t in state.items():
            expected = live[name].data if name in pruned else ft.read(name)  # the rest as in the fine-tune
            assert t.dtype == expected.dtype and torch.equal(t, expected), (method, rate, name)
        resident.restore()


def test_compact_delta_is_a_fraction_of_the_fine_tune_and_materialises_to_the_export(tiny, tmp_path):
    folder = save_compact_delta(BASE, FT, tmp_path / "delta", rate=0.9, seed=5)
    ft_bytes = (tiny / "sentiment3" / "model.safetensors").stat().st_size
    ratio = ft_bytes / (folder / COMPACT_FILE).stat().st_size
    assert ratio > 5, f"the compact delta is only {ratio:.2f}x smaller than the fine-tune"
    card = read_card_front_matter(folder)
    assert card["base_model"] == "deltakit/tiny-base" and card["base_model_relation"] == "finetune"
    assert card["deltakit"]["method"] == "dare" and card["deltakit"]["rate"] == 0.9 and card["deltakit"]["seed"] == 5
    assert "8 bytes of key per tensor" in (folder / "README.md").read_text()
    out = materialise_compact_delta(folder, BASE, tmp_path / "model")
    exported = export_pruned(BASE, FT, tmp_path / "exported", method="dare", rate=0.9, seed=5)
    (m1, t1), (m2, t2) = _load(out), _load(exported)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    assert torch.equal(_logits(m1, t1), _logits(m2, t2))
    assert read_card_front_matter(out)["base_model_relation"] == "finetune"
    with pytest.raises(ExportError, match="not empty"):
        materialise_compact_delta(folder, BASE, tmp_path / "model")


def test_compact_delta_refuses_another_base(tiny, bert_family, tmp_path):
    folder = save_compact_delta(BASE, FT, tmp_path / "delta", rate=0.9, seed=5)
    for wrong in ("family:tiny/polarity", str(bert_family["base"])):  # another member; another model altogether
        with pytest.raises(CompactDeltaError, match=r"made against base 'family:tiny/base'.*given base") as err:
            load_compact_delta(folder, wrong)
        assert wrong in str(err.value)
        with pytest.raises(CompactDeltaError):
            materialise_compact_delta(folder, wrong, tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_push_to_hub_then_resolve_gives_identical_weights(local_hub, hf_home, tiny, tmp_path, capsys):
    from huggingface_hub import HfApi, snapshot_download

    token = "hf_" + "Z" * 34  # the local Hub accepts any token; it must never be printed or written
    folder = export_pruned(BASE, FT, tmp_path / "pruned", method="dare", rate=0.9, seed=1)
    repo = f"export{next(_repos)}/tiny-dare"
    pinned = push_to_hub(folder, repo, token=token)
    assert pinned.startswith(f"{repo}@") and len(pinned.split("@")[1]) == 40
    snapshot = resolve(repo)
    assert snapshot.commit == pinned.split("@")[1] and resolve(pinned).path == snapshot.path
    here, there = TensorReader(folder), TensorReader(snapshot.path)
    assert here.names() == there.names() and all(torch.equal(here.read(n), there.read(n)) for n in here.names())
    (m1, t1), (m2, t2) = _load(folder), _load(snapshot.path)
    assert torch.equal(_logits(m1, t1), _logits(m2, t2))
    tags = HfApi().model_info(repo).tags
    assert "base_model:finetune:deltakit/tiny-base" in tags and "deltakit" in tags
    assert push_to_hub(folder, repo, endpoint=local_hub.url) == pinned  # nothing changed: no new commit
    # A compact delta travels the same way and rebuilds from its download.
    delta = save_compact_delta(BASE, FT, tmp_path / "delta", rate=0.9, seed=1)
    push_to_hub(delta, f"{repo}-compact")
    downloaded = Path(snapshot_download(f"{repo}-compact"))
    state = load_compact_delta(downloaded, BASE)
    assert all(torch.equal(state[n], here.read(n)) for n in here.names())
    out = capsys.readouterr()
    written = b"".join(p.read_bytes() for root in (folder, delta) for p in root.iterdir())
    assert token not in out.out + out.err and token.encode() not in written
    # A new export pushed over it is a new commit; the pinned reference still gives the old weights.
    old = {n: here.read(n) for n in here.names()}
    export_pruned(BASE, FT, folder, method="dare", rate=0.5, seed=2, overwrite=True)
    newer = push_to_hub(folder, repo)
    assert newer != pinned and resolve(repo).commit == newer.split("@")[1]
    again = TensorReader(resolve(pinned).path)
    assert all(torch.equal(again.read(n), t) for n, t in old.items())
    assert not all(torch.equal(TensorReader(resolve(newer).path).read(n), t) for n, t in old.items())


def test_push_to_hub_refuses_what_is_not_an_export(local_hub, hf_home, tmp_path):
    with pytest.raises(ExportError, match="not a non-empty folder"):
        push_to_hub(tmp_path / "missing", "export/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a non-empty folder"):
        push_to_hub(tmp_path / "empty", "export/x")
