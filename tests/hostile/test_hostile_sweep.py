"""Bad sweep and stats requests: refused when planned (before any model loads), with one line naming the value and
the fix; models that would run their own code or lack weights are refused; failed points make the run exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit import masks
from deltakit.cli import main
from deltakit.methods import get_method
from deltakit.resident import ResidentModel
from deltakit.spec import normalise_rates

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records every attempt to load a model: planning errors must come before any."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded although the request was invalid")

    monkeypatch.setattr(ResidentModel, "__init__", refuse)
    return calls


# (id, extra CLI arguments, words the one-line message must contain)
PLANNING_CASES = [
    ("q-above-one", ["--methods", "darex_q:q=2", "--rates", "0.5"], ["q=2", "[1 - rate, 1]"]),
    ("q-zero", ["--methods", "darex_q:q=0", "--rates", "0.5"], ["q=0", "[1 - rate, 1]"]),
    ("q-not-a-number", ["--methods", "darex_q:q=abc"], ["'abc'", "parameter q must be"]),
    ("q-below-one-minus-rate", ["--methods", "darex_q:q=0.2", "--rates", "0.5", "0.9"], ["rate 0.5", "q=0.2"]),
    ("unknown-parameter", ["--methods", "darex_q:foo=1"], ["'foo'", "takes ['q']"]),
    ("parameter-for-dare", ["--methods", "dare:q=0.5"], ["'q'", "no parameters"]),
    ("structural-axis", ["--methods", "structural:axis=diag"], ["'diag'", "row", "col"]),
    ("bool-parameter", ["--methods", "magnitude:rescale=maybe"], ["'maybe'", "bool"]),
    ("strategy-unknown-parameter", ["--methods", "darex_q_labelled:n_seeds=2"], ["'n_seeds'", "search_seed"]),
    ("strategy-parameter-type", ["--methods", "darex_q_unlabelled:n_seeds=two"], ["'two'", "int"]),
    ("malformed-parameter", ["--methods", "darex_q:q"], ["KEY=VALUE"]),
    ("unknown-method", ["--methods", "dair"], ["'dair'", "register"]),
    ("rate-above-one", ["--rates", "1.5"], ["1.5", "[0, 1]"]),
    ("rate-negative", ["--rates", "-0.1"], ["-0.1", "[0, 1]"]),
    ("rate-nan", ["--rates", "nan"], ["nan", "[0, 1]"]),
    ("seed-negative", ["--seeds", "-1"], ["[-1]", "non-negative"]),
    ("device-bogus", ["--device", "bogus"], ["'bogus'", "'cpu'"]),
    ("device-cuda-without-gpu", ["--device", "cuda"], ["'cuda'", "no CUDA device"]),
    ("device-tpu", ["--device", "meta"], ["'meta'", "'cpu' or 'cuda'"]),
    ("unknown-preset", ["--preset", "everything"], ["'everything'", "mergelm_encoder"]),
    ("bad-regex", ["--include", "("], ["regex"]),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA case expects no GPU")
@pytest.mark.parametrize("args, words", [c[1:] for c in PLANNING_CASES], ids=[c[0] for c in PLANNING_CASES])
def test_bad_sweep_request_is_refused_before_loading(args, words, no_loading, tiny, tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["sweep", BASE, FT, "--out", str(tmp_path / "out"), *args])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("deltakit: error:") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not no_loading and elapsed < 10


def test_triton_backend_without_triton_names_the_install(no_loading, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("deltakit.kernels.apply.triton_available", lambda: False)
    assert main(["sweep", BASE, FT, "--backend", "triton", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "triton" in err and "pip install deltakit[triton]" in err and not no_loading


@pytest.mark.parametrize("rate", ["0.5", True, None, [0.5]], ids=["string", "bool", "none", "list"])
def test_rate_of_the_wrong_type_is_refused_by_every_entry_point(rate):
    for check in (masks.check_rate, lambda r: normalise_rates([r]),
                  lambda r: get_method("dare").fn(torch.ones(4), rate=r, seed=0, name="w")):
        with pytest.raises(ValueError, match="rate must be a number in \\[0, 1\\]"):
            check(rate)


def test_exclude_that_leaves_nothing_prunable_is_an_error(tiny, tmp_path, capsys):
    assert main(["sweep", BASE, FT, "--exclude", ".*", "--rates", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nothing to prune" in err and "exclude=['.*']" in err and "--exclude" in err


def _copy_member(tiny: Path, member: str, dest: Path) -> Path:
    shutil.copytree(tiny / member, dest)
    return dest


def _evil(folder: Path, marker: Path) -> None:
    """Code that would leave a marker file if anything ever imported it."""
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def test_unknown_architecture_with_remote_code_is_refused_without_a_prompt(tiny, tmp_path):
    """Run as a user would, in a subprocess with no stdin: no question, no code run, a clear exit 2 quickly."""
    marker = tmp_path / "pwned"
    folders = []
    for member in ("base", "sentiment3"):
        folder = _copy_member(tiny, member, tmp_path / member)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="evil-bert", auto_map={
            "AutoConfig": "modeling_evil.EvilConfig",
            "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
        (folder / "config.json").write_text(json.dumps(config))
        _evil(folder, marker)
        folders.append(str(folder))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deltakit.cli", "sweep", *folders, "--rates", "0.5", "--task",
                           str(folders[1]), "--out", str(tmp_path / "o")], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "'evil-bert'" in proc.stderr and "auto_map" in proc.stderr and "never runs code" in proc.stderr
    assert not marker.exists() and time.perf_counter() - t0 < 120


def test_known_architecture_ignores_auto_map_and_runs_no_code(tiny, tmp_path):
    marker = tmp_path / "pwned"
    ft = _copy_member(tiny, "sentiment3", tmp_path / "ft")
    config = json.loads((ft / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (ft / "config.json").write_text(json.dumps(config))
    _evil(ft, marker)
    from deltakit.sources import resolve

    rm = ResidentModel(resolve(tiny / "base"), resolve(ft))
    assert type(rm.model).__name__ == "BertForSequenceClassification" and not marker.exists()


@pytest.mark.parametrize("with_tokenizer_json", [True, False], ids=["builtin-backend", "refused"])
def test_tokenizer_mapped_to_remote_code_never_runs_it(with_tokenizer_json, tiny, tmp_path):
    """With a tokenizer.json transformers' built-in backend reads it; without one the tokenizer is refused."""
    marker = tmp_path / "pwned"
    ft = _copy_member(tiny, "sentiment3", tmp_path / "ft")
    tok = json.loads((ft / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (ft / "tokenizer_config.json").write_text(json.dumps(tok))
    _evil(ft, marker)
    from deltakit.sources import SourceError, resolve

    if with_tokenizer_json:
        rm = ResidentModel(resolve(tiny / "base"), resolve(ft))
        assert rm.tokenizer("a tweet")["input_ids"]
    else:
        (ft / "tokenizer.json").unlink()
        with pytest.raises(SourceError, match="tokenizer of .*auto_map.*never runs"):
            ResidentModel(resolve(tiny / "base"), resolve(ft))
    assert not marker.exists()


def test_finetune_missing_a_weight_is_refused(tiny, tmp_path):
    ft = _copy_member(tiny, "sentiment3", tmp_path / "ft")
    state = load_file(ft / "model.safetensors")
    name = next(n for n in state if n.endswith("attention.self.query.weight"))
    del state[name]
    save_file(state, ft / "model.safetensors")
    from deltakit.sources import SourceError, resolve

    with pytest.raises(SourceError, match=f"lacks 1 weight.*{name}.*randomly"):
        ResidentModel(resolve(tiny / "base"), resolve(ft))


def test_shared_rows_sweep_prunes_the_shared_vocabulary_and_keeps_added_rows(tiny, tmp_path):
    """A fine-tune with added tokens: refused with the hint, then pruned on the shared rows with --shared-rows."""
    ft = _copy_member(tiny, "sentiment3", tmp_path / "ft")
    state = load_file(ft / "model.safetensors")
    name = next(n for n in state if n.endswith("word_embeddings.weight"))
    extra = torch.randn(3, state[name].shape[1], generator=torch.Generator().manual_seed(0))
    state[name] = torch.cat([state[name], extra])
    save_file(state, ft / "model.safetensors")
    config = json.loads((ft / "config.json").read_text())
    config["vocab_size"] += 3
    (ft / "config.json").write_text(json.dumps(config))
    from deltakit.pairing import PairingError
    from deltakit.sources import resolve

    base, fine = resolve(tiny / "base"), resolve(ft)
    with pytest.raises(PairingError, match="--shared-rows"):
        ResidentModel(base, fine)
    rm = ResidentModel(base, fine, shared_rows=True)
    target = next(t for t in rm.targets if t.name == name)
    rm.apply("dare", rate=0.9, seed=0)
    rows = target.base.shape[0] - 3
    assert torch.equal(target.param[rows:], extra.to(target.param.dtype))  # added rows: fine-tuned values
    changed = (target.param[:rows] != target.ft[:rows]).float().mean()
    assert 0.5 < float(changed) <= 1.0  # shared rows: ~90% of their deltas dropped


def test_failed_points_make_the_run_exit_1_and_say_why(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["sweep", BASE, FT, "--methods", "darex_q_labelled:metric=nosuch", "--rates", "0.5", "--seeds", "0",
                 "--limit", "16", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 point(s) failed" in captured.err and "nosuch" in captured.err and "rerun" in captured.err
    assert "finetuned" in captured.out  # the points that worked are reported and kept


def test_stats_out_that_is_a_file_is_refused_before_computing(tiny, tmp_path, capsys, monkeypatch):
    target = tmp_path / "file"
    target.write_text("x")
    monkeypatch.setattr("deltakit.stats.delta_stats", lambda *a, **k: pytest.fail("computed before checking --out"))
    assert main(["stats", BASE, FT, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "file" in err


def test_stats_write_error_keeps_the_printed_results(tiny, tmp_path, capsys, monkeypatch):
    def full_disk(self, out):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr("deltakit.stats.DeltaStats.save", full_disk)
    assert main(["stats", BASE, FT, "--json", "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["global"]  # the results were printed before the write failed
    assert "No space left on device" in captured.err and "free disk space" in captured.err


def test_stats_save_replaces_files_atomically(tiny, tmp_path, monkeypatch):
    from deltakit.stats import DeltaStats, delta_stats

    stats = delta_stats(BASE, [FT], progress=False)
    stats.save(tmp_path / "o")
    before = (tmp_path / "o" / "summary.json").read_bytes()
    monkeypatch.setattr(DeltaStats, "to_json", lambda self: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        stats.save(tmp_path / "o")
    assert (tmp_path / "o" / "summary.json").read_bytes() == before  # the old complete file is still there
    assert not list((tmp_path / "o").glob(".*.tmp"))


def test_debug_shows_the_traceback(no_loading, tiny, tmp_path):
    with pytest.raises(ValueError, match="q=2"):
        main(["--debug", "sweep", BASE, FT, "--methods", "darex_q:q=2", "--rates", "0.5"])


@pytest.mark.parametrize("args, words", [
    (["--limit", "0"], ["eval_limit", "0", "positive"]),
    (["--out", "{file}"], ["{file}", "is a file"]),
], ids=["limit-zero", "out-is-a-file"])
def test_bad_demo_request_is_refused_before_building(args, words, tmp_path, capsys, monkeypatch):
    """The demo builds fine-tunes for minutes: a request it cannot finish fails before the first one."""
    monkeypatch.setattr("deltakit.families.build_family", lambda *a, **k: pytest.fail("built before checking"))
    target = tmp_path / "file"
    target.write_text("x")
    fill = {"file": str(target)}
    t0 = time.perf_counter()
    code = main(["demo", "--out", str(tmp_path / "demo"), *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("deltakit: error:") and time.perf_counter() - t0 < 10
    assert all(w.format(**fill) in err for w in words), err


def test_decoder_task_file_without_usable_columns_names_what_each_task_needs(tiny_llm, tmp_path, capsys):
    data = tmp_path / "glue-like.csv"
    data.write_text("sentence,idx\nhello,0\nworld,1\n")
    code = main(["sweep", "family:tiny-llm/base", "family:tiny-llm/arith", "--task", str(data), "--split", "test",
                 "--rates", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot tell the task from columns ['sentence', 'idx']" in err
    assert "'choices'" in err and "'answer'" in err and "'text'" in err
    assert not (tmp_path / "o" / "results.jsonl").exists() or not (tmp_path / "o" / "results.jsonl").read_text()


def test_decoder_choice_labels_outside_the_choices_are_refused(tiny_llm, tmp_path, capsys):
    data = tmp_path / "mc.jsonl"
    data.write_text('{"context": "Q: 1+1?", "choices": ["2", "3"], "label": 2}\n')
    code = main(["sweep", "family:tiny-llm/base", "family:tiny-llm/arith", "--task", str(data), "--split", "test",
                 "--rates", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "label 2 is outside its choices" in err
