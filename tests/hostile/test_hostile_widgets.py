"""Bad inputs in the widgets: each error is shown in place, names the value and the fix, and the widget stays usable.

Every case types one bad value into a widget built with good ones, runs it (``blocking=True``), reads the message
where the widget shows it (the field's error line, or the status), then puts the good value back and runs again:
that run must succeed. No exception may escape a worker thread.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deltakit.widgets import ModelPicker, StatsDashboard, SweepPanel


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, bert_family: dict[str, Path]) -> dict[str, str]:
    """Model folders and other values the cases refer to by name (``{base}``, ``{corrupt}``, ...)."""
    root = tmp_path_factory.mktemp("hostile-widgets")
    shutil.copytree(bert_family["base"], root / "base")
    shutil.copytree(bert_family["ft1"], root / "ft")
    shutil.copytree(root / "ft", root / "gpt")  # same tensors, another architecture
    (root / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for name in ("corrupt", "weightless"):
        (root / name).mkdir()
        shutil.copy(root / "ft" / "config.json", root / name)
    header = b"[1, 2, 3]"  # JSON, but not the object a safetensors header is
    (root / "corrupt" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    read_only = root / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anyway: use a folder of sysfs, where nobody can create files
        read_only = Path("/sys/kernel")
    return {name: str(root / name) for name in ("base", "ft", "gpt", "corrupt", "weightless")} | {
        "root": str(root), "read_only": str(read_only)}


@pytest.fixture(scope="module")
def silent_hub() -> Iterator[str]:
    """A Hub endpoint on 127.0.0.1 that accepts connections (listen backlog) and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def _evaluate(model) -> dict[str, float]:
    return {"accuracy": 0.5}


@dataclass(frozen=True)
class Kind:
    """How to build a widget from the good models, run it, and tell that a run succeeded."""

    make: Callable[[dict[str, str]], object]
    run: Callable[[object], None]
    succeeded: Callable[[object], bool]


KINDS = {
    "picker": Kind(lambda m: ModelPicker(m["base"], m["ft"]), lambda w: w.resolve(blocking=True),
                   lambda w: "paired tensors" in w.status.value),
    "dashboard": Kind(lambda m: StatsDashboard(m["base"], [m["ft"]]), lambda w: w.compute(blocking=True),
                      lambda w: w.status.value.startswith("done")),
    "sweep": Kind(lambda m: SweepPanel(m["base"], m["ft"], methods=["dare"], rates=(0.5,), seeds=(0,),
                                       evaluator=_evaluate), lambda w: w.run(blocking=True),
                  lambda w: w.status.value.startswith("done")),
}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    bad: dict[str, object]  # control attribute -> bad value ("{name}" strings are filled from `models`)
    where: str  # the attribute whose value shows the message
    expect: tuple[str, ...]  # fragments of the message, filled from `models` like `bad`
    silent_hub: bool = False  # point the Hub at an endpoint that never answers (1 s timeout)


TIMED_OUT = ("did not answer within 1 s", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_OFFLINE=1")
CORRUPT = ("CorruptCheckpointError", "'model.safetensors' in {corrupt}", "not a valid safetensors file", "publisher")
CASES = [
    Case("corrupt-header-finetune", "picker", {"fine_tune_id": "{corrupt}"}, "fine_tune_error", CORRUPT),
    Case("corrupt-header-base", "picker", {"base_id": "{corrupt}"}, "base_error", CORRUPT),
    Case("corrupt-header-stats", "dashboard", {"fine_tunes": "{corrupt}"}, "status", ("failed:", *CORRUPT)),
    Case("corrupt-header-sweep", "sweep", {"fine_tune": "{corrupt}"}, "status", ("failed:", *CORRUPT)),
    Case("missing-folder", "dashboard", {"fine_tunes": "{root}/nowhere"}, "status",
         ("SourceError", "'{root}/nowhere' does not exist", "check the path")),
    Case("wrong-repo-id", "picker", {"base_id": "nobody/nothing"}, "base_error",
         ("SourceError", "model repo 'nobody/nothing' not found", "check the id (org/name)")),
    Case("hub-timeout", "picker", {"base_id": "org/model"}, "base_error", ("SourceError", *TIMED_OUT),
         silent_hub=True),
    Case("mismatched-models", "picker", {"fine_tune_id": "{gpt}"}, "fine_tune_error",
         ("PairingError", "different architectures", "'gpt2'", "pick the base the fine-tune was trained from")),
    Case("base-without-weights", "dashboard", {"base": "{weightless}"}, "status",
         ("SourceError", "'{weightless}' has no safetensors weights", "Point at a full checkpoint")),
    Case("bad-rates", "sweep", {"rates": "0.1, abc"}, "status",
         ("not started", "'abc' is not a number", "separate values by commas or spaces")),
    Case("bad-seeds", "sweep", {"seeds": "0, x"}, "status", ("not started", "'x' is not an integer")),
    Case("bad-method", "sweep", {"methods": (), "method_specs": "no_such_method"}, "status",
         ("not started", "unknown pruning method 'no_such_method'", "registered: ", "To add one")),
    Case("read-only-out", "sweep", {"out": "{read_only}"}, "status",
         ("failed:", "StoreError", "{read_only}", "make it writable")),
]


def _fill(value: object, models: dict[str, str]) -> object:
    return value.format(**models) if isinstance(value, str) else value


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_shown_in_place_and_the_widget_stays_usable(case: Case, models, silent_hub, hf_home,
                                                                 monkeypatch):
    escaped: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    if case.silent_hub:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "ENDPOINT", silent_hub)
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    kind = KINDS[case.kind]
    widget = kind.make(models)
    good = {name: getattr(widget, name).value for name in case.bad}
    for name, value in case.bad.items():
        getattr(widget, name).value = _fill(value, models)

    kind.run(widget)
    shown = html.unescape(getattr(widget, case.where).value)
    for fragment in case.expect:
        assert _fill(fragment, models) in shown, shown
    assert not widget.job.running

    for name, value in good.items():
        getattr(widget, name).value = value
    kind.run(widget)
    assert kind.succeeded(widget), widget.status.value
    assert escaped == []


# --- MergePanel: the same checks, with a second fine-tune to merge ------------------------------------------------
from deltakit.widgets import MergePanel  # noqa: E402 - the merge cases were added after the others

KINDS["merge"] = Kind(lambda m: MergePanel(m["base"], [m["ft"], m["ft2"]], methods=["ta", "dare_ta"], rates=(0.5,),
                                           lambdas=(1.0,), seeds=(0,), evaluators=[_evaluate, _evaluate]),
                      lambda w: w.run(blocking=True), lambda w: w.status.value.startswith("done"))
MERGE_CASES = [
    Case("merge-one-finetune", "merge", {"more_fine_tunes": "{ft}"}, "status",
         ("not started", "a merge takes 2 to 8 fine-tunes", "got 1")),
    Case("merge-corrupt-finetune", "merge", {"more_fine_tunes": "{ft} {corrupt}"}, "status", ("failed:", *CORRUPT)),
    Case("merge-q-out-of-range", "merge", {"method_specs": "dare_ta:q=5"}, "status",
         ("not started", "dare_ta(q=5) cannot run at rate 0.5", "q must be in [1 - rate, 1]")),
]


@pytest.fixture(scope="module")
def merge_models(models: dict[str, str], bert_family: dict[str, Path]) -> dict[str, str]:
    """``models`` plus ``{ft2}``: a second fine-tune of the same base, to merge with ``{ft}``."""
    ft2 = Path(models["root"]) / "ft2"
    shutil.copytree(bert_family["ft2"], ft2, dirs_exist_ok=True)
    return models | {"ft2": str(ft2)}


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c.name)
def test_bad_merge_input_is_shown_in_place_and_the_panel_stays_usable(case: Case, merge_models, silent_hub, hf_home,
                                                                      monkeypatch):
    test_bad_input_is_shown_in_place_and_the_widget_stays_usable(case, merge_models, silent_hub, hf_home, monkeypatch)
