"""Model references -> local snapshot folders.

A model reference is one of (checked in this order):

* ``family:FAMILY/MEMBER`` -- a member of an embedded family (``deltakit family list``), built on demand;
* a local directory (an existing path) holding a Hub-style checkpoint;
* ``org/name`` or ``org/name@REVISION`` -- a Hub repo, optionally pinned to a branch, tag or commit.

Hub references are resolved with huggingface_hub's ``snapshot_download``, which honours ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HOME`` and the user's login (deltakit never reads, prints or stores the token). Only
safetensors weights, configs, tokenizer files and the model card are fetched (pickles only with
``allow_pickle=True``); the snapshot folder is named after the resolved commit, so the result is pinned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Snapshot", "SourceError", "resolve", "read_card"]

FAMILY_PREFIX = "family:"
_ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "vocab*", "merges.txt",
          "*.model", "README.md"]
_PICKLE_ALLOW = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class SourceError(ValueError):
    """A model reference could not be resolved to a usable local snapshot."""


@dataclass(frozen=True)
class Snapshot:
    """A resolved model reference.

    Attributes:
        ref: the reference as the user wrote it.
        path: the local folder with the checkpoint files.
        kind: ``"hub"``, ``"local"`` or ``"family"``.
        repo_id: the Hub repo id (hub), or the family member's model id (family); None for a plain folder.
        commit: the resolved 40-hex commit (hub) or None.
        config: the parsed ``config.json`` ({} if absent).
        card: the YAML front matter of ``README.md`` ({} if absent).
    """

    ref: str
    path: Path
    kind: str
    repo_id: str | None = None
    commit: str | None = None
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    card: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """A short human name: the member / repo id, or the folder name."""
        if self.kind == "family":
            return self.ref[len(FAMILY_PREFIX):]
        return self.repo_id or self.path.name


def read_card(folder: Path) -> dict[str, Any]:
    """Return the YAML front matter of ``folder/README.md`` ({} if there is none or it is not YAML)."""
    readme = Path(folder) / "README.md"
    if not readme.exists():
        return {}
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    parts = text.split("---", 2)
    if len(parts) < 3:
        return {}
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_config(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def _check_weights(path: Path, ref: str, allow_pickle: bool, pickles: list[str] | None = None) -> None:
    """Refuse a snapshot without usable weights; ``pickles`` lists pickle files known to exist remotely."""
    has_st = any(path.glob("*.safetensors"))
    local_pickles = [p.name for p in path.glob("pytorch_model*.bin")]
    if has_st or (allow_pickle and local_pickles):
        return
    if pickles or local_pickles:
        raise SourceError(
            f"{ref!r} has only pickled weights ({pickles or local_pickles}). deltakit reads safetensors by default "
            "because a pickle can run code when loaded; if you trust this model pass allow_pickle=True "
            "(CLI: --allow-pickle)."
        )
    raise SourceError(f"{ref!r} has no safetensors weights in {path}: expected model.safetensors or a sharded index.")


def _split_hub_ref(ref: str) -> tuple[str, str | None]:
    repo_id, _, revision = ref.partition("@")
    parts = repo_id.split("/")
    if not repo_id or len(parts) > 2 or not all(parts) or any(c.isspace() for c in ref):
        raise SourceError(
            f"{ref!r} is not a model reference. Use 'org/name', 'org/name@revision', an existing local directory, "
            "or 'family:FAMILY/MEMBER' (see `deltakit family list`)."
        )
    return repo_id, (revision or None)


def _hub_snapshot(ref: str, allow_pickle: bool) -> Snapshot:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = _split_hub_ref(ref)
    patterns = _ALLOW + (_PICKLE_ALLOW if allow_pickle else [])
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError as err:
        raise SourceError(
            f"revision {revision!r} not found in {repo_id!r}: use a branch, a tag or a full commit sha "
            f"(list them with huggingface_hub.list_repo_refs({repo_id!r}))."
        ) from err
    except GatedRepoError as err:
        raise SourceError(
            f"{repo_id!r} is gated: accept its terms on the Hub and log in (`hf auth login`), then retry."
        ) from err
    except RepositoryNotFoundError as err:
        raise SourceError(
            f"model repo {repo_id!r} not found at {constants.ENDPOINT}: check the id (org/name); a private repo "
            "needs `hf auth login`."
        ) from err
    except LocalEntryNotFoundError as err:
        mode = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"
        raise SourceError(
            f"{ref!r} is not in the local cache and {mode}: connect once (or unset HF_HUB_OFFLINE) to download it, "
            "or pass a local directory."
        ) from err
    except Exception as err:  # connection errors: OSError subclasses, or httpx's ConnectError / TimeoutException
        if not isinstance(err, OSError) and not any(w in type(err).__name__ for w in ("Connect", "Timeout", "Network")):
            raise
        raise SourceError(
            f"could not download {ref!r} from {constants.ENDPOINT} ({type(err).__name__}: {err}). Check the network, "
            "or set HF_HUB_OFFLINE=1 to use the cache."
        ) from err
    pickles = None
    if not any(path.glob("*.safetensors")) and not allow_pickle and not constants.HF_HUB_OFFLINE:
        # Say precisely why nothing came: the repo may hold only pickles, which the patterns skipped.
        pickles = [f for f in HfApi().list_repo_files(repo_id, revision=path.name) if f.endswith(".bin")]
    _check_weights(path, ref, allow_pickle, pickles)
    return Snapshot(ref, path, "hub", repo_id, path.name, _read_config(path), read_card(path))


def resolve(ref: str | os.PathLike[str], *, allow_pickle: bool = False) -> Snapshot:
    """Resolve a model reference to a local snapshot.

    Args:
        ref: ``family:FAMILY/MEMBER``, a local directory, ``org/name`` or ``org/name@revision``.
        allow_pickle: accept pickled weights when a model has no safetensors (unsafe for untrusted models).

    Returns:
        The snapshot, with its parsed config and model card.

    Raises:
        SourceError: unknown reference, missing repo or revision, no network and no cache, or no usable weights.
        KeyError: unknown family or member (the message lists the available ones).
    """
    text = os.fspath(ref)
    if text.startswith(FAMILY_PREFIX):
        from deltakit.families.build import get_family, member_path

        family, _, member = text[len(FAMILY_PREFIX):].partition("/")
        if not family or not member:
            raise SourceError(f"{text!r}: a family reference is 'family:FAMILY/MEMBER', e.g. family:tiny/sentiment3.")
        path = member_path(family, member)
        return Snapshot(text, path, "family", get_family(family).model_id(member), None, _read_config(path),
                        read_card(path))
    local = Path(text).expanduser()
    if local.is_dir():
        _check_weights(local, text, allow_pickle)
        return Snapshot(text, local, "local", read_card(local).get("model_id"), None, _read_config(local),
                        read_card(local))
    if text.startswith((".", "/", "~")):
        raise SourceError(f"local directory {text!r} does not exist.")
    return _hub_snapshot(text, allow_pickle)
