"""deltakit.export on synthetic checkpoints: compact seeded deltas rebuild the pruned tensors bit for bit, and exported
folders are written atomically with a card that carries the facts (no transformers model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltakit import masks
from deltakit.export import (
    COMPACT_FILE,
    COMPACT_FORMAT,
    CompactDeltaError,
    ExportError,
    export_model,
    load_compact_delta,
    save_compact_delta,
)
from deltakit.prune import apply_method
from deltakit.refs import read_card_front_matter
from deltakit.tensors import TensorReader
from synthetic import bert_like, write_checkpoint

RATES = [0.0, 0.3, 0.9, 1.0]
METHODS = [("dare", None), ("drop_only", None), ("darex_q", "half")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = 11


def _pair(root: Path, dtype: torch.dtype = torch.float32, base_dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """A bare-key base and a ``bert.``-prefixed fine-tune with a head and an integer buffer, in the given dtypes."""
    base = bert_like(0)
    ft = bert_like(1, prefix="bert.", head=True, scale=1e-2, base=base)
    cast = (lambda d, to: {k: v.to(to) if v.is_floating_point() else v for k, v in d.items()})
    b = write_checkpoint(root / "base", cast(base, base_dtype or dtype), card={"model_id": "org/base"})
    f = write_checkpoint(root / "ft", cast(ft, dtype), card={"base_model": "org/base"})
    (f / "tokenizer_config.json").write_text("{}")
    return b, f


def _read(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _expected(base_dir: Path, ft_dir: Path, method: str, rate: float, q: float | None) -> dict[str, torch.Tensor]:
    """The sweep point computed directly: apply_method on every prunable tensor, the rest as in the fine-tune."""
    base, ft = _read(base_dir), _read(ft_dir)
    out = {}
    for name, t in ft.items():
        core = name.removeprefix("bert.")
        if core in base and t.is_floating_point():
            dst = torch.empty_like(t)
            out[name] = apply_method(dst, base[core].to(t.dtype), t, method=method, rate=rate, seed=SEED, name=name,
                                     **({"q": q} if q is not None else {}))
        else:
            out[name] = t
    return out


def _q(q: str | None, rate: float) -> float | None:
    return None if q is None else 1.0 - rate / 2  # inside [1 - rate, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("method,q", METHODS)
def test_round_trip_is_bit_exact(tmp_path, method, q, rate, dtype):
    b, f = _pair(tmp_path, dtype)
    q = _q(q, rate)
    folder = save_compact_delta(b, f, tmp_path / "delta", method=method, rate=rate, seed=SEED, q=q)
    state = load_compact_delta(folder, b)
    expected = _expected(b, f, method, rate, q)
    assert list(state) == TensorReader(f).names()  # keyed and ordered like the fine-tune's checkpoint
    for name, t in expected.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name


def test_base_stored_in_another_dtype_is_cast_as_the_resident_model_does(tmp_path):
    b, f = _pair(tmp_path, torch.bfloat16, base_dtype=torch.float32)
    folder = save_compact_delta(b, f, tmp_path / "delta", rate=0.7, seed=SEED)
    state = load_compact_delta(folder, b)
    for name, t in _expected(b, f, "dare", 0.7, None).items():
        assert torch.equal(state[name], t), name


def test_file_holds_kept_values_only_and_the_document_describes_them(tmp_path):
    b, f = _pair(tmp_path)
    folder = save_compact_delta(b, f, tmp_path / "delta", rate=0.9, seed=SEED)
    ft = _read(f)
    with safe_open(str(folder / COMPACT_FILE), "pt") as fh:
        doc = json.loads(fh.metadata()["deltakit"])
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert doc["format"] == COMPACT_FORMAT and doc["method"] == "dare" and doc["rate"] == 0.9
    assert doc["scale"] == 1.0 / (1.0 - 0.9) and doc["q"] is None and doc["seed"] == SEED
    kinds = {e["name"]: e for e in doc["tensors"]}
    assert kinds["classifier.weight"]["stored"] == "full" and torch.equal(stored["classifier.weight"],
                                                                         ft["classifier.weight"])
    assert kinds["bert.embeddings.position_ids"]["stored"] == "full"
    pruned = [e for e in doc["tensors"] if e["stored"] == "kept"]
    assert len(pruned) == 9
    for e in pruned:
        mask = masks.keep_mask(SEED, e["name"], e["shape"], 0.9)
        values = stored[e["name"]]
        assert e["kept"] == int(mask.sum()) == values.numel() and values.dim() == 1
        assert torch.equal(values, ft[e["name"]][mask])  # the fine-tuned values, exact
        assert e["key"] == masks.tensor_key(SEED, e["name"])
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    card = read_card_front_matter(folder)
    assert card["base_model"] == "org/base" and card["base_model_relation"] == "finetune"
    assert card["deltakit"]["format"] == COMPACT_FORMAT and card["deltakit"]["seed"] == SEED


def test_excluded_tensors_are_stored_in_full(tmp_path):
    b, f = _pair(tmp_path)
    folder = save_compact_delta(b, f, tmp_path / "delta", rate=0.9, seed=SEED, exclude=[r".*LayerNorm.*"])
    ft, state = _read(f), load_compact_delta(folder, b)
    for name in ("bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.output.LayerNorm.weight"):
        assert torch.equal(state[name], ft[name])


@pytest.mark.parametrize("method", ["magnitude", "structural"])
def test_methods_whose_mask_is_not_a_seeded_function_are_refused(tmp_path, method):
    b, f = _pair(tmp_path)
    with pytest.raises(CompactDeltaError, match=r"cannot be stored as a compact seeded delta.*dare"):
        save_compact_delta(b, f, tmp_path / "delta", method=method, rate=0.5, seed=0)
    assert not (tmp_path / "delta").exists()


def test_unknown_method_and_q_misuse_are_refused(tmp_path):
    b, f = _pair(tmp_path)
    with pytest.raises(KeyError, match="unknown pruning method"):
        save_compact_delta(b, f, tmp_path / "d", method="nope", rate=0.5, seed=0)
    with pytest.raises(CompactDeltaError, match="darex_q needs one float q"):
        save_compact_delta(b, f, tmp_path / "d", method="darex_q", rate=0.5, seed=0)
    with pytest.raises(CompactDeltaError, match="darex_q needs one float q"):
        save_compact_delta(b, f, tmp_path / "d", method="darex_q", rate=0.5, seed=0, q=torch.ones(8))
    with pytest.raises(CompactDeltaError, match="q is a parameter of darex_q only"):
        save_compact_delta(b, f, tmp_path / "d", method="dare", rate=0.5, seed=0, q=0.7)
    with pytest.raises(ValueError, match=r"q must be in \[1 - rate, 1\]"):
        save_compact_delta(b, f, tmp_path / "d", method="darex_q", rate=0.5, seed=0, q=0.2)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        save_compact_delta(b, f, tmp_path / "d", rate=1.5, seed=0)
    assert not (tmp_path / "d").exists()


# -- export_model with a stand-in model: the folder, the card, atomicity --------------------------------------------
class StandInModel(torch.nn.Module):
    """What export_model needs of a transformers model: ``save_pretrained(folder)``; ``fail`` makes it break midway."""

    def __init__(self, fail: bool = False, pickle: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.fail, self.pickle = fail, pickle

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps({"model_type": "bert"}))
        if self.pickle:
            torch.save(self.state_dict(), Path(folder) / "pytorch_model.bin")
            return
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(Path(folder) / "model.safetensors"))
        if self.fail:
            raise OSError("No space left on device")


CARD = {"base_model": "org/base", "base_model_relation": "finetune", "method": "dare", "rate": 0.9, "seed": 0,
        "params": {}, "metrics": {"accuracy": 0.875}, "fine_tune": "org/ft"}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_export_model_writes_weights_and_a_card_with_the_facts(tmp_path):
    folder = export_model(StandInModel(), None, tmp_path / "out", card=CARD)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = read_card_front_matter(folder)
    assert card["base_model"] == "org/base" and card["base_model_relation"] == "finetune"
    assert card["library_name"] == "transformers" and card["tags"][:3] == ["deltakit", "dare", "pruned"]
    assert card["deltakit"] == {"method": "dare", "rate": 0.9, "seed": 0, "metrics": {"accuracy": 0.875},
                                "fine_tune": "org/ft"}
    body = (folder / "README.md").read_text()
    assert "DARE" in body and "0.875" in body and "org/ft" in body
    merged = export_model(StandInModel(), None, tmp_path / "merged",
                          card=dict(CARD, base_model_relation="merge", method="ties", fine_tune=None,
                                    fine_tunes=["org/a", "org/b"], **{"lambda": 0.4}))
    card = read_card_front_matter(merged)
    assert card["base_model_relation"] == "merge" and "merged" in card["tags"] and card["deltakit"]["lambda"] == 0.4


@pytest.mark.parametrize("bad,match", [
    ({"base_model": None}, "must name the base"),
    ({"base_model_relation": "adapter"}, "must be one of"),
    ({"method": ""}, "must name the method"),
    ({"colour": "blue"}, "unknown keys"),
    ({"fine_tune": "see hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"}, "looks like a Hugging Face access token"),
])
def test_a_bad_card_is_refused_before_anything_is_written(tmp_path, bad, match):
    with pytest.raises(ExportError, match=match):
        export_model(StandInModel(), None, tmp_path / "out", card=dict(CARD, **bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_existing_non_empty_target_is_refused_and_overwrite_replaces_it_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out exists and is not empty.*overwrite=True \(CLI: --force\)"):
        export_model(StandInModel(), None, target, card=CARD)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    export_model(StandInModel(), None, target, card=CARD, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    export_model(StandInModel(), None, tmp_path / "empty", card=CARD)  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(StandInModel(), None, tmp_path / "file", card=CARD, overwrite=True)


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "out"
    export_model(StandInModel(), None, target, card=CARD)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OSError, match="No space left"):
        export_model(StandInModel(fail=True), None, target, card=CARD, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(OSError, match="No space left"):
        export_model(StandInModel(fail=True), None, tmp_path / "new", card=CARD)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_pickled_weights_are_never_exported(tmp_path):
    with pytest.raises(ExportError, match="safetensors only"):
        export_model(StandInModel(pickle=True), None, tmp_path / "out", card=CARD)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
