"""Model references -> local snapshot folders.

A model reference (:class:`ModelRef`, parsed once by :meth:`ModelRef.parse`) is one of (checked in this order):

* ``family:FAMILY/MEMBER`` -- a member of an embedded family (``deltakit family list``), built on demand by the
  family layer (:func:`deltakit.families.member_path`);
* a local directory (an existing folder, or a path starting with ``.``, ``/`` or ``~``) holding a Hub-style
  checkpoint;
* ``org/name`` or ``org/name@REVISION`` -- a Hub repo, optionally pinned to a branch, tag or commit.

Hub references are resolved with huggingface_hub's ``snapshot_download``, which honours ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HOME`` and the user's login (deltakit never reads, prints or stores the token). Only
safetensors weights, configs, tokenizer files and the model card are fetched (pickles only with
``allow_pickle=True``); the snapshot folder is named after the resolved commit, so the result is pinned. With
``stream=True`` only the small files are fetched and the weights are read later by byte ranges
(:mod:`deltakit.hubstream`), never written to disk.

Every Hub request is bounded in time (:func:`deltakit.hubhttp.bound_hub_requests`). References and snapshots are
defined in :mod:`deltakit.refs` and re-exported here.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from deltakit.hubhttp import bound_hub_requests, hub_network_errors
from deltakit.refs import CARD_FILE, FAMILY_PREFIX, ModelRef, Snapshot, SourceError, read_card_front_matter

__all__ = ["CARD_FILE", "FAMILY_PREFIX", "ModelRef", "Snapshot", "SourceError", "read_card_front_matter", "resolve"]

_ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "vocab*", "merges.txt",
          "*.model", CARD_FILE]
_PICKLE_ALLOW = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def _read_config(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def _has_safetensors(path: Path) -> bool:
    """Whether ``path`` holds weights the reader reads: ``model.safetensors`` or ``model.safetensors.index.json``."""
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _check_weights(path: Path, ref: str, allow_pickle: bool, pickles: list[str] | None = None, *,
                   remote: list[str] | None = None, where: str | None = None) -> None:
    """Refuse a snapshot without usable weights; ``pickles`` lists pickle files known to exist remotely.

    With ``remote`` (the repo's file names, for a streamed snapshot whose folder holds no weights) the check runs
    on those names instead of the folder, and ``where`` names the repo in the messages.
    """
    if remote is None:
        names = [p.name for p in path.iterdir() if p.is_file()]
        found = _has_safetensors(path)
    else:
        names = [n for n in remote if "/" not in n]
        found = "model.safetensors" in names or "model.safetensors.index.json" in names
    local_pickles = sorted(fnmatch.filter(names, "pytorch_model*.bin"))
    if found or (allow_pickle and remote is None and local_pickles):
        return
    if remote is not None and local_pickles:
        raise SourceError(
            f"{ref!r} has only pickled weights ({local_pickles}); streaming reads safetensors only. Drop --stream "
            "(stream=False) to download them, and pass allow_pickle=True (CLI: --allow-pickle) if you trust this "
            "model (a pickle can run code when loaded)."
        )
    if pickles or local_pickles:
        raise SourceError(
            f"{ref!r} has only pickled weights ({pickles or local_pickles}). deltakit reads safetensors by default "
            "because a pickle can run code when loaded; if you trust this model pass allow_pickle=True "
            "(CLI: --allow-pickle)."
        )
    stray = sorted(fnmatch.filter(names, "*.safetensors"))
    path = where or path
    if stray:
        raise SourceError(
            f"{ref!r} has no usable safetensors weights in {path}: deltakit reads model.safetensors or the shards "
            f"listed in model.safetensors.index.json, and found only {stray}. If that is the whole model, rename it "
            "model.safetensors; for shards, add their model.safetensors.index.json (an adapter alone is no model)."
        )
    raise SourceError(
        f"{ref!r} has no safetensors weights in {path}: expected model.safetensors or model.safetensors.index.json "
        "with its shards. Point at a full checkpoint (save_pretrained writes one)."
    )


def _hub_snapshot(ref: str, model: ModelRef, allow_pickle: bool, stream: bool = False) -> Snapshot:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = model.repo_id, model.revision
    if stream and constants.HF_HUB_OFFLINE:
        raise SourceError(f"{ref!r}: streaming reads the weights from the Hub, but HF_HUB_OFFLINE is set. Unset it, "
                          "or drop --stream (stream=False) to read a downloaded copy from the cache.")
    # Streaming fetches only the small files; the weights are read later by byte ranges (deltakit.hubstream).
    patterns = [p for p in _ALLOW if p != "*.safetensors"] if stream else \
        _ALLOW + (_PICKLE_ALLOW if allow_pickle else [])
    bound_hub_requests()
    remote = None
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      etag_timeout=constants.HF_HUB_ETAG_TIMEOUT))
        pickles = None
        if stream:  # the weights are not in the folder: check the repo's listing at the pinned commit
            remote = HfApi().list_repo_files(repo_id, revision=path.name)
        elif not _has_safetensors(path) and not allow_pickle and not constants.HF_HUB_OFFLINE:
            # Say precisely why nothing came: the repo may hold only pickles, which the patterns skipped.
            pickles = [f for f in HfApi().list_repo_files(repo_id, revision=path.name) if f.endswith(".bin")]
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
        mode, fix = (("HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE and connect once to download it")
                     if constants.HF_HUB_OFFLINE else
                     (f"{constants.ENDPOINT} is unreachable", "check the network and HF_ENDPOINT"))
        raise SourceError(f"{ref!r} is not in the local cache and {mode}: {fix}, or pass a local directory.") from err
    except hub_network_errors() as err:
        raise SourceError(
            f"could not download {ref!r} from {constants.ENDPOINT} ({type(err).__name__}: {err}). Check the network "
            "and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache."
        ) from err
    _check_weights(path, ref, allow_pickle, pickles, remote=remote,
                   where=f"{repo_id}@{path.name}" if stream else None)
    return Snapshot(ref, path, "hub", repo_id, path.name, _read_config(path), read_card_front_matter(path),
                    streamed=stream)


def resolve(ref: str | os.PathLike[str], *, allow_pickle: bool = False, stream: bool = False) -> Snapshot:
    """Resolve a model reference to a local snapshot.

    Args:
        ref: ``family:FAMILY/MEMBER``, a local directory, ``org/name`` or ``org/name@revision``.
        allow_pickle: accept pickled weights when a model has no safetensors (unsafe for untrusted models).
        stream: for a Hub reference, fetch only the small files (config, card, index, tokenizer) and pin the
            commit; the weights are then read by byte ranges (:mod:`deltakit.hubstream`) and never written to disk.
            Local folders and family members are on disk already: ``stream`` does not apply to them and is ignored.

    Returns:
        The snapshot, with its parsed config and model card.

    Raises:
        SourceError: unknown reference, missing repo or revision, no network and no cache, or no usable weights.
        KeyError: unknown family or member (the message lists the available ones).
    """
    text = os.fspath(ref)
    model = ModelRef.parse(text)
    if model.kind == "hub":
        return _hub_snapshot(text, model, allow_pickle, stream)
    if model.kind == "family":
        # The one way down into the family layer, imported here so that resolving a Hub id or a folder never loads
        # it; member_path builds a member that is not built yet (with progress bars), then returns its folder.
        from deltakit.families import member_path

        path = member_path(model.family, model.member)
    else:
        path = model.path
        if not path.is_dir():
            raise SourceError(f"local directory {text!r} does not exist: check the path (a Hub model is 'org/name').")
        _check_weights(path, text, allow_pickle)
    card = read_card_front_matter(path)
    return Snapshot(text, path, model.kind, card.get("model_id"), None, _read_config(path), card)
