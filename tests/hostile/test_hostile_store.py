"""The results store under faults: concurrent sweeps, SIGKILL, full disks, damaged lines, bad folders, retrained
checkpoints. Every case bounds its time, checks the message names the value and the fix, and checks that nothing
already computed is lost or duplicated: the store ends up equal to an uninterrupted run's (timing columns aside)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from deltakit.cli import main
from deltakit.sources import Snapshot, resolve
from deltakit.spec import RunOptions, SweepSpec
from deltakit.store import ResultStore, StoreError, StoreLockedError, fingerprint
from deltakit.sweep import sweep
from deltakit.tensors import TensorReader

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"
GRID = dict(methods=["dare"], rates=[0.2, 0.4, 0.6, 0.8], seeds=[0, 1])  # 2 references + 8 points
N_POINTS = 10
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMING = ["prep_seconds", "eval_seconds", "peak_host_mb", "peak_device_mb"]  # measured, not results

# A sweep of GRID in a subprocess: python -c SCRIPT OUT DELAY [FILE_SIZE_LIMIT]
SCRIPT = f"""
import resource, sys
sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]
from test_hostile_store import BASE, FT, GRID, Probe
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import sweep
if len(sys.argv) > 3:  # bytes, as `ulimit -f` limits a shell's children (Python ignores SIGXFSZ: writes fail)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]),) * 2)
sweep(SweepSpec(BASE, FT, **GRID), RunOptions(out=sys.argv[1], progress=False), evaluator=Probe(float(sys.argv[2])))
print("DONE", flush=True)
"""


class Probe:
    """A cheap deterministic evaluator (mean |weight| of a pruned tensor, and a NaN metric); counts its calls."""

    fingerprint = "hostile-store-probe-v1"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        time.sleep(self.delay)  # widens the window in which a subprocess can be killed or contended
        weight = model.bert.encoder.layer[0].attention.self.query.weight
        return {"accuracy": float(weight.detach().abs().mean()), "loss": float("nan")}


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    assert time.monotonic() - t0 < seconds, f"took {time.monotonic() - t0:.1f} s, bound {seconds} s"


def run(out: Path, probe: Probe | None = None, wait: bool = False) -> pd.DataFrame:
    return sweep(SweepSpec(BASE, FT, **GRID), RunOptions(out=out, progress=False, wait=wait),
                 evaluator=probe or Probe())


def frame(out: Path) -> pd.DataFrame:
    """The store's tidy frame without timing columns, in a canonical order."""
    df = ResultStore(out).frame().drop(columns=TIMING)
    return df.sort_values(["key", "metric"]).reset_index(drop=True)


def assert_complete(out: Path, reference: Path) -> None:
    """Every point of an uninterrupted run is in the store exactly once, with the same values."""
    got = frame(out)
    assert not got.duplicated(["key", "metric"]).any()
    pd.testing.assert_frame_equal(got, frame(reference))


def lines(out: Path) -> list[bytes]:
    return (out / "results.jsonl").read_bytes().splitlines(keepends=True)


def start(out: Path, delay: float, *limit: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(delay), *map(str, limit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_points(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while len(ResultStore(out).done_keys()) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the sweep subprocess did not store {n} point(s): {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store folder of an uninterrupted run of GRID."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTAKIT_HOME", str(tiny_home))
        run(out)
    return out


# -- two writers ------------------------------------------------------------------------------------------------
def test_second_sweep_fails_fast_naming_the_holder_or_waits_for_it(tiny, tmp_path, reference, capsys):
    out = tmp_path / "out"
    holder = start(out, delay=0.4)
    wait_for_points(out, 1, holder)
    with within(5):
        code = main(["sweep", BASE, FT, "--rates", "0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"pid {holder.pid}" in err and str(out) in err and "--wait" in err and "--out" in err
    waiter = Probe()
    with within(60):
        run(out, waiter, wait=True)  # blocks until the holder is done, then finds every point finished
    assert holder.wait(timeout=10) == 0 and "DONE" in holder.stdout.read()
    assert waiter.calls == 0
    assert_complete(out, reference)


def test_writer_lock_in_one_process_and_readers_need_none(tmp_path):
    store, other = ResultStore(tmp_path / "s"), ResultStore(tmp_path / "s")
    with store.writer():
        with within(1), pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}.*wait=True.*--out"):
            with other.writer():
                pass
        assert other.frame().empty  # reading needs no lock
        acquired = threading.Event()

        def wait_for_the_lock() -> None:
            with other.writer(wait=True):
                acquired.set()

        waiter = threading.Thread(target=wait_for_the_lock)
        waiter.start()
        assert not acquired.wait(0.3)  # blocked while the first writer holds the folder
    assert acquired.wait(5)
    waiter.join(5)
    assert (tmp_path / "s" / ".lock").read_text() == ""  # the holder's details leave with the lock


def test_cli_passes_wait_through(monkeypatch):
    seen = {}

    def fake_sweep(spec, options, **kwargs):
        seen.update(wait=options.wait, out=options.out)
        raise StoreLockedError("stop here")

    monkeypatch.setattr("deltakit.sweep.sweep", fake_sweep)
    assert main(["sweep", BASE, FT, "--wait", "--out", "x"]) == 2
    assert seen["wait"] is True and seen["out"] == "x"


# -- crashes and full disks ----------------------------------------------------------------------------------
def test_sigkilled_sweep_resumes_to_the_uninterrupted_result(tiny, tmp_path, reference):
    out = tmp_path / "out"
    proc = start(out, delay=0.3)
    wait_for_points(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ResultStore(out).done_keys()
    assert 3 <= len(done) < N_POINTS
    probe = Probe()
    with within(30):
        run(out, probe)  # the kernel released the dead process's lock
    assert probe.calls == N_POINTS - len(done)
    assert_complete(out, reference)


def test_file_size_limit_mid_sweep_keeps_whole_records_and_a_rerun_completes(tiny, tmp_path, reference):
    out = tmp_path / "out"
    sizes = [len(line) for line in lines(reference)]
    limit = sum(sizes[:3]) + sizes[3] // 2  # three records fit, the fourth does not
    proc = start(out, 0.0, limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "StoreError" in err, err[-2000:]
    assert str(out / "results.jsonl") in err and "Free disk space" in err and "3 finished point(s) are kept" in err
    stored = lines(out)
    assert len(stored) == 3 and all(line.endswith(b"\n") and json.loads(line)["key"] for line in stored)
    probe = Probe()
    with within(30):
        run(out, probe)
    assert probe.calls == N_POINTS - 3
    assert_complete(out, reference)


def _failing(errno_: int | None = None, short: bool = False) -> Callable:
    """An ``os.write`` that fails (or writes half) on results.jsonl from the 4th record on."""
    real, count = os.write, [0]

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            count[0] += 1
            if count[0] > 3:
                if short:
                    return real(fd, data[: len(data) // 2])
                raise OSError(errno_, os.strerror(errno_))
        return real(fd, data)

    return write


def _failing_fsync() -> Callable:
    real, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            count[0] += 1
            if count[0] > 3:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    return fsync


@pytest.mark.parametrize("attribute, fake, reason", [
    ("write", lambda: _failing(errno.ENOSPC), "No space left on device"),
    ("write", lambda: _failing(errno.EFBIG), "File too large"),
    ("write", lambda: _failing(short=True), "short write"),
    ("fsync", _failing_fsync, "Input/output error"),
], ids=["disk-full", "file-too-large", "short-write", "fsync-io-error"])
def test_failed_append_leaves_no_partial_record(tiny, tmp_path, reference, monkeypatch, attribute, fake, reason):
    out = tmp_path / "out"
    with within(30), monkeypatch.context() as mp, pytest.raises(StoreError) as info:
        mp.setattr(os, attribute, fake())
        run(out)
    message = str(info.value)
    assert str(out / "results.jsonl") in message and reason in message and "(key " in message
    assert "Free disk space" in message and "3 finished point(s) are kept" in message
    assert [json.loads(line)["key"] for line in lines(out)] == [json.loads(x)["key"] for x in lines(reference)[:3]]
    probe = Probe()
    run(out, probe)  # the lock was released with the error
    assert probe.calls == N_POINTS - 3
    assert_complete(out, reference)


# -- damaged lines --------------------------------------------------------------------------------------------
def _edit(record: bytes, **changes) -> bytes:
    data = json.loads(record)
    for key, value in changes.items():
        data.pop(key) if value is ... else data.__setitem__(key, value)
    return json.dumps(data).encode() + b"\n"


DAMAGED = [  # (id, line 3 replaced by ...)
    ("not-json", lambda line: b"{not json\n"),
    ("half-a-record", lambda line: line[: len(line) // 2] + b"\n"),
    ("number", lambda line: b"42\n"),
    ("array", lambda line: b"[1, 2]\n"),
    ("string", lambda line: b'"results"\n'),
    ("null", lambda line: b"null\n"),
    ("no-key", lambda line: _edit(line, key=...)),
    ("no-status", lambda line: _edit(line, status=...)),
    ("key-not-text", lambda line: _edit(line, key=7)),
    ("old-per-metric-row", lambda line: _edit(line, metrics=..., metric="accuracy", value=0.5)),
    ("not-utf8", lambda line: b"\xff\xfe\xfd\n"),
    ("deep-nesting", lambda line: b"[" * 100_000 + b"\n"),
]


@pytest.mark.filterwarnings("ignore:.*not a sweep record")  # the final comparison reads the file again
@pytest.mark.parametrize("damage", [d for _, d in DAMAGED], ids=[i for i, _ in DAMAGED])
def test_a_damaged_line_is_skipped_with_one_warning_and_recomputed(tiny, tmp_path, reference, damage):
    out = tmp_path / "out"
    out.mkdir()
    stored = lines(reference)
    (out / "results.jsonl").write_bytes(b"".join(stored[:2] + [damage(stored[2])] + stored[3:]))
    probe = Probe()
    with within(30), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(out, probe)
    messages = [str(w.message) for w in caught if "sweep record" in str(w.message)]
    assert len(messages) == 1, messages
    assert str(out / "results.jsonl") in messages[0] and "line(s) 3." in messages[0]
    assert "recomputes" in messages[0]
    assert probe.calls == 1  # only the damaged point
    assert_complete(out, reference)


@pytest.mark.filterwarnings("ignore:.*not a sweep record")
def test_a_partial_last_line_from_a_crash_is_ended_before_the_next_record(tiny, tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    stored = lines(reference)
    (out / "results.jsonl").write_bytes(b"".join(stored[:-1]) + stored[-1][:40])  # no newline at the end
    probe = Probe()
    with within(30), pytest.warns(UserWarning, match=f"line\\(s\\) {N_POINTS}\\."):
        run(out, probe)
    assert probe.calls == 1
    assert_complete(out, reference)


def _record(key: str, status: str = "ok", value: float = 1.0, error: str | None = None) -> dict:
    return dict(key=key, method="dare", label="dare", params="{}", q=0.5, rate=0.5, seed=0, status=status,
                error=error, prep_seconds=0.0, eval_seconds=0.0, metrics={"accuracy": value} if status == "ok" else {},
                base="b", fine_tune="f")


@pytest.mark.parametrize("records, expected", [
    ([_record("a", value=1.0), _record("a", value=2.0)], [("ok", 1.0)]),  # first success wins
    ([_record("a", "failed", error="e1"), _record("a", value=2.0)], [("ok", 2.0)]),  # success supersedes failure
    ([_record("a", value=1.0), _record("a", "failed", error="e1")], [("ok", 1.0)]),  # a later failure changes nothing
    ([_record("a", "failed", error="e1"), _record("a", "failed", error="e2")], [("failed", "e2")]),  # latest error
    ([_record("a", value=1.0)] * 1000 + [_record("b", value=3.0)], [("ok", 1.0), ("ok", 3.0)]),  # a flood
], ids=["ok-ok", "failed-ok", "ok-failed", "failed-failed", "many-duplicates"])
def test_duplicates_are_dropped_on_read_without_warnings(tmp_path, records, expected):
    store = ResultStore(tmp_path / "s")
    store.folder.mkdir()
    store.path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with within(5), warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = store.rows()
    assert [(r["status"], r["value"] if r["status"] == "ok" else r["error"]) for r in rows] == expected


# -- strict JSON ----------------------------------------------------------------------------------------------
def test_nan_and_infinity_are_stored_as_null_and_read_back_as_nan(tiny, tmp_path):
    out = tmp_path / "out"

    def evaluator(model: torch.nn.Module) -> dict[str, float]:
        evaluator.calls += 1
        if evaluator.calls == 3:
            raise RuntimeError("evaluation broke")
        return {"nan": float("nan"), "inf": float("inf"), "ok": 0.5}

    evaluator.calls, evaluator.fingerprint = 0, "nan-evaluator"
    spec, options = SweepSpec(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0]), RunOptions(out=out, progress=False)
    sweep(spec, options, evaluator=evaluator)

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    for line in lines(out):
        json.loads(line, parse_constant=refuse)  # strict readers accept every line
    df = ResultStore(out).frame()
    ok = df[df["status"] == "ok"].set_index(["method", "metric"])["value"]
    assert ok.loc[("finetuned", "nan")] != ok.loc[("finetuned", "nan")]  # NaN
    assert ok.loc[("finetuned", "inf")] != ok.loc[("finetuned", "inf")]  # infinity has no JSON token: null -> NaN
    assert ok.loc[("finetuned", "ok")] == 0.5
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and failed["metric"].isna().all() and failed["value"].isna().all()
    assert "evaluation broke" in failed["error"].iloc[0]
    assert df.loc[df["method"] == "base", "q"].isna().all()  # a reference point has no q: null -> NaN
    sweep(spec, options, evaluator=evaluator)
    assert evaluator.calls == 4  # only the failed point ran again; NaN-valued points count as done


# -- bad folders ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, words", [
    (lambda out: out.write_text("x"), ["is a file", "--out"]),
    (lambda out: (out / "results.jsonl").mkdir(parents=True), ["results.jsonl is a folder", "move"]),
], ids=["out-is-a-file", "results-is-a-folder"])
def test_a_bad_folder_is_refused_before_any_model_loads(tiny, tmp_path, monkeypatch, make, words):
    out = tmp_path / "out"
    make(out)
    monkeypatch.setattr("deltakit.sweep.resolve", lambda *a, **k: pytest.fail("resolved a model before the check"))
    with within(2), pytest.raises(StoreError) as info:
        run(out)
    assert str(out) in str(info.value) and all(w in str(info.value) for w in words)


REFUSE = """
import sys
from deltakit.store import ResultStore, StoreError
for path in sys.argv[1:]:
    try:
        with ResultStore(path).writer():
            print("opened")
    except StoreError as err:
        print(err)
"""


def test_read_only_places_are_refused_with_the_path_and_the_fix():
    """Run as an unprivileged user: root may write anywhere, whatever the permission bits say."""
    top = Path(tempfile.mkdtemp(prefix="deltakit-ro-"))
    try:
        (top / "ro").mkdir()
        (top / "rw").mkdir()
        (top / "rw" / "results.jsonl").write_text("")
        (top / "rw" / "results.jsonl").chmod(0o444)
        (top / "ro").chmod(0o555)
        (top / "rw").chmod(0o777)
        top.chmod(0o755)
        cases = [(top / "ro", "cannot be written"), (top / "ro" / "new", f"its parent {top / 'ro'} is read-only"),
                 (top / "rw", "cannot open")]
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        with within(20):
            result = subprocess.run([*drop, sys.executable, "-c", REFUSE, *(str(p) for p, _ in cases)], cwd=ROOT,
                                    capture_output=True, text=True, timeout=60)
        messages = result.stdout.splitlines()
        assert len(messages) == len(cases), result.stderr[-2000:]
        for (path, words), message in zip(cases, messages):
            assert str(path) in message and words in message and "--out" in message, message
        assert not (top / "ro" / "new").exists() and (top / "rw" / "results.jsonl").read_text() == ""
    finally:
        (top / "ro").chmod(0o755)
        shutil.rmtree(top)


def test_reading_creates_nothing_and_needs_no_store(tmp_path):
    missing = tmp_path / "missing"
    with within(1):
        assert ResultStore(missing).frame().empty and ResultStore(missing).done_keys() == set()
    assert not missing.exists()
    with pytest.raises(StoreError, match="not open for writing"):
        ResultStore(missing).append(_record("a"))


def test_parquet_is_replaced_atomically(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "s")
    with store.writer():
        store.append(_record("a"))
        before = store.write_parquet().read_bytes()

        def half_then_full(self, path, **kwargs):
            Path(path).write_bytes(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_full)
        store.append(_record("b"))
        with pytest.raises(StoreError, match=r"results\.parquet.*No space left.*Free disk space"):
            store.write_parquet()
    assert (tmp_path / "s" / "results.parquet").read_bytes() == before
    assert not list((tmp_path / "s").glob(".*.tmp"))


# -- what pins a model ----------------------------------------------------------------------------------------
def test_a_retrained_checkpoint_is_recomputed_and_an_unchanged_one_is_not(tiny, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(resolve(FT).path, ft)
    spec = SweepSpec(BASE, str(ft), methods=["dare"], rates=[0.5], seeds=[0])
    options = RunOptions(out=tmp_path / "out", progress=False)
    first = Probe()
    sweep(spec, options, evaluator=first)
    weights = ft / "model.safetensors"
    os.utime(weights, (time.time() + 100, time.time() + 100))  # touched, not changed
    unchanged = Probe()
    sweep(spec, options, evaluator=unchanged)
    assert first.calls == 3 and unchanged.calls == 0
    stat = weights.stat()
    reader = TensorReader(ft)
    with weights.open("r+b") as fh:  # retrain: same shapes and header, new values, same size and mtime
        for name in reader.names():
            info, tensor = reader.info(name), reader.read(name)
            if tensor.is_floating_point():
                fh.seek(info.start)
                fh.write((tensor * 1.01).contiguous().view(torch.uint8).numpy().tobytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    retrained = Probe()
    sweep(spec, options, evaluator=retrained)
    assert retrained.calls == 3
    assert ResultStore(tmp_path / "out").frame()["key"].nunique() == 6


def test_fingerprint_reads_a_constant_amount_of_a_huge_checkpoint(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}).encode()
    with (tmp_path / "model.safetensors").open("wb") as fh:  # 4 GiB, sparse: hashing it whole would take seconds
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + 2**32)
    (tmp_path / "config.json").write_text("{}")
    snapshot = Snapshot(str(tmp_path), tmp_path, "local")
    with within(1):
        first = fingerprint(snapshot)
    assert first.startswith("sha256:") and fingerprint(snapshot) == first
    (tmp_path / "config.json").write_text('{"num_labels": 3}')
    assert fingerprint(snapshot) != first
    hub = Snapshot("org/m", tmp_path / "absent", "hub", "org/m", "a" * 40)
    assert fingerprint(hub) == "org/m@" + "a" * 40
