"""Test-suite wiring: environment first, then a session-wide local Hub, then fixtures.

huggingface_hub, transformers and datasets read their environment variables (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE,
...) once, when they are imported. So this module sets them at import time, before any test module can import those
libraries, and starts the local Hub server first so that HF_ENDPOINT can point at it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

# Without a GPU, Triton runs its kernels in the CPU interpreter (it must be set before anything imports triton).
# On a machine with an NVIDIA driver the kernels compile for the device, so the `gpu` tests test the real thing.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Point every Hugging Face library at throwaway state: a developer's own cache, token or offline switch must not
# change what the tests see. Per-test isolation comes from the `hf_home` fixture below.
for _name in (
    "HUGGINGFACE_CO_STAGING",  # would override HF_ENDPOINT with the staging Hub
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_DATASETS_CACHE",
    "HF_MODULES_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
):
    os.environ.pop(_name, None)
_SESSION_HF_HOME = tempfile.mkdtemp(prefix="deltakit-hf-home-")
atexit.register(shutil.rmtree, _SESSION_HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _SESSION_HF_HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
# A proxy from CI must not intercept requests to the local server.
_no_proxy = [h for h in os.environ.get("NO_PROXY", "").split(",") if h] + ["127.0.0.1", "localhost"]
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(dict.fromkeys(_no_proxy))

# Tests import `deltakit` from the checkout even when it is not installed, and the test-only Hub server as
# `tests.hubserver` (it is not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hubserver import LocalHub  # noqa: E402 - must follow the environment set-up above

# Had a pytest plugin or the repository's conftest.py imported a Hugging Face library already, that library would
# have read HF_ENDPOINT before it is set below and would talk to huggingface.co instead.
_imported_too_early = [name for name in ("huggingface_hub", "transformers", "datasets") if name in sys.modules]
if _imported_too_early:
    raise RuntimeError(
        f"{_imported_too_early} were imported before tests/conftest.py set HF_ENDPOINT; keep module-level imports "
        "of huggingface_hub, transformers and datasets out of conftest.py files and of what they import (import "
        "them inside functions)."
    )

LOCAL_HUB = LocalHub()
os.environ["HF_ENDPOINT"] = LOCAL_HUB.start()
atexit.register(LOCAL_HUB.stop)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def local_hub() -> LocalHub:
    """The running session-wide local Hub that HF_ENDPOINT points at. Give each test's repos unique names."""
    return LOCAL_HUB


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty HF_HOME for one test, so downloads, `.no_exist` markers and prepared datasets do not leak.

    Setting the variable only reaches subprocesses: the libraries already in this process copied the paths into
    module constants at import time, so those constants are patched too. `datasets` is imported here for that
    reason: importing it for the first time inside a test would freeze that test's temporary paths into it.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import HfFileSystem

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_ASSETS_CACHE", str(home / "assets"))
    monkeypatch.setattr(hub_constants, "HF_XET_CACHE", str(home / "xet"))
    # scan_cache_dir() binds the cache path by name at import.
    monkeypatch.setattr("huggingface_hub.utils._cache_manager.HF_HUB_CACHE", str(home / "hub"))
    datasets_cache = home / "datasets"
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", datasets_cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", datasets_cache / "downloads" / "extracted")
    # transformers only keeps the remote-code module cache; patch it when transformers is already loaded.
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr("transformers.utils.hub.HF_MODULES_CACHE", str(home / "modules"))
    # fsspec reuses HfFileSystem instances, with their directory listings, across calls: start from none.
    HfFileSystem.clear_instance_cache()
    yield home
    HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode for one test: huggingface_hub (and transformers, datasets through it) refuse all HTTP.

    To download first and then go offline inside one test, call ``request.getfixturevalue("hub_offline")``.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets keeps its own copy of the switch


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DELTAKIT_HOME holding the built `tiny` family (built once per test session, in seconds)."""
    from deltakit.families import build_family

    home = tmp_path_factory.mktemp("deltakit-home")
    build_family("tiny", home=home, progress=False)
    return home


@pytest.fixture
def tiny(tiny_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DELTAKIT_HOME points at the built tiny family for this test; returns the family folder."""
    monkeypatch.setenv("DELTAKIT_HOME", str(tiny_home))
    return tiny_home / "families" / "tiny"


@pytest.fixture(scope="session")
def tiny_llm_home(tiny_home: Path) -> Path:
    """``tiny_home`` with the decoder family `tiny-llm` built in it too (seconds, once per session)."""
    from deltakit.families import build_family

    build_family("tiny-llm", home=tiny_home, progress=False)
    return tiny_home


@pytest.fixture
def tiny_llm(tiny_llm_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DELTAKIT_HOME points at the built tiny and tiny-llm families; returns the tiny-llm folder."""
    monkeypatch.setenv("DELTAKIT_HOME", str(tiny_llm_home))
    return tiny_llm_home / "families" / "tiny-llm"


# The `fast` tier (`python -m pytest -m fast`, well under a minute on 2 cores) for the edit-test loop: pure functions
# on synthetic tensors, no family to build, no model to download.
_FAST = (Path(__file__).parent / "unit", Path(__file__).parent / "hostile" / "test_hostile_reader.py")


def _card(front: dict) -> str:
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n# test model\n"


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders ``base``, ``ft1`` (small deltas) and ``ft2`` (larger deltas); member -> folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("bert-family")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    (root / "base" / "README.md").write_text(_card({"model_id": "test/base"}))
    out = {"base": root / "base"}
    for i, (name, scale) in enumerate((("ft1", 0.01), ("ft2", 0.05))):
        ft = BertForSequenceClassification(cfg)
        ft.bert.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.bert.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        ft.save_pretrained(root / name)
        (root / name / "README.md").write_text(_card({"base_model": "test/base", "base_model_relation": "finetune"}))
        out[name] = root / name
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the `fast` tier by path; skip tests marked `gpu` when no CUDA device is present."""
    for item in items:
        if any(item.path == fast or fast in item.path.parents for fast in _FAST):
            item.add_marker(pytest.mark.fast)
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch  # lazily: collecting CPU-only tests must not pay for importing torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
