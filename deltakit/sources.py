"""Model references -> local snapshot folders.

A model reference is one of (checked in this order):

* ``family:FAMILY/MEMBER`` -- a member of an embedded family (``deltakit family list``), built on demand;
* a local directory (an existing path) holding a Hub-style checkpoint;
* ``org/name`` or ``org/name@REVISION`` -- a Hub repo, optionally pinned to a branch, tag or commit.

Hub references are resolved with huggingface_hub's ``snapshot_download``, which honours ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HOME`` and the user's login (deltakit never reads, prints or stores the token). Only
safetensors weights, configs, tokenizer files and the model card are fetched (pickles only with
``allow_pickle=True``); the snapshot folder is named after the resolved commit, so the result is pinned.

Every Hub request is bounded in time (:func:`bound_hub_requests`): huggingface_hub sends its metadata requests
(repo info, file listings, searches) without any timeout and retries a timed-out request up to five times with
back-off, so an endpoint that accepts connections and never answers used to block for minutes or for ever.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

__all__ = ["Snapshot", "SourceError", "bound_hub_requests", "hub_timeouts", "resolve", "read_card"]

FAMILY_PREFIX = "family:"
_ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "vocab*", "merges.txt",
          "*.model", "README.md"]
_PICKLE_ALLOW = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


#: Seconds allowed to open a connection to the Hub (less when the read timeout is smaller).
CONNECT_TIMEOUT_S = 10.0
#: Seconds allowed between two reads from the Hub when ``HF_HUB_DOWNLOAD_TIMEOUT`` is not set.
READ_TIMEOUT_S = 30.0


class SourceError(ValueError):
    """A model reference could not be resolved to a usable local snapshot."""


def hub_timeouts() -> dict[str, float]:
    """The timeouts, in seconds, that a Hub request gets when huggingface_hub gives it none.

    ``read`` and ``write`` are ``HF_HUB_DOWNLOAD_TIMEOUT`` when set, else :data:`READ_TIMEOUT_S`; ``connect`` and
    ``pool`` are :data:`CONNECT_TIMEOUT_S`, or the read timeout when that is smaller. The variable is read at each
    request. File downloads and their metadata requests keep huggingface_hub's own timeouts
    (``HF_HUB_DOWNLOAD_TIMEOUT`` and ``HF_HUB_ETAG_TIMEOUT``, 10 s each by default).

    Returns:
        ``{"connect": ..., "read": ..., "write": ..., "pool": ...}``, the keys of an httpx timeout.
    """
    read = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or READ_TIMEOUT_S)
    connect = min(CONNECT_TIMEOUT_S, read)
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def _http() -> ModuleType:
    """The HTTP library huggingface_hub talks through: httpx2 from its v2, httpx before."""
    try:
        from huggingface_hub.utils import httpx  # huggingface_hub >= 1.30 exports the module it uses
    except ImportError:  # older 1.x releases use httpx
        import httpx
    return httpx


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached".

    ``OfflineModeIsEnabled`` and many connection failures are ``OSError`` subclasses; huggingface_hub lets the
    transport errors of its HTTP library (connection refused, DNS failures) through unchanged.
    """
    return OSError, _http().TransportError


def _timeout_error(request: Any, err: Exception) -> SourceError:
    """The message for a Hub request that timed out: the host, the timeout used, what to do."""
    phase = type(err).__name__.removesuffix("Timeout").lower()  # from ConnectTimeout, ReadTimeout, ...
    seconds = request.extensions["timeout"].get(phase)
    host = f"{request.url.scheme}://{request.url.netloc.decode()}"
    waited = "accept a connection" if phase == "connect" else "answer"
    return SourceError(
        f"the Hub at {host} did not {waited} within {seconds:g} s ({request.method} {request.url.path}). Check the "
        "network and HF_ENDPOINT; if the Hub is only slow, raise HF_HUB_DOWNLOAD_TIMEOUT (seconds); to work from the "
        "local cache, set HF_HUB_OFFLINE=1."
    )


def _bounded_client_class() -> type:
    """An HTTP client class that gives each request :func:`hub_timeouts` and turns a timeout into a SourceError.

    The SourceError is not one of the errors huggingface_hub retries or falls back on, so one timed-out request
    ends the whole call: the wait is bounded by one request's timeouts, not multiplied by retries.
    """
    http = _http()

    class BoundedStream(http.SyncByteStream):
        """A streamed response body whose read timeouts end the call too (file downloads stream)."""

        def __init__(self, stream: Any, request: Any) -> None:
            self._stream, self._request = stream, request

        def __iter__(self):
            try:
                yield from self._stream
            except http.TimeoutException as err:
                raise _timeout_error(self._request, err) from err

        def close(self) -> None:
            self._stream.close()

    class BoundedClient(http.Client):
        def send(self, request: Any, **kwargs: Any) -> Any:
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {
                key: given[key] if given.get(key) is not None else value for key, value in hub_timeouts().items()
            }
            try:
                response = super().send(request, **kwargs)
            except http.TimeoutException as err:
                raise _timeout_error(request, err) from err
            response.stream = BoundedStream(response.stream, request)
            return response

    return BoundedClient


@functools.cache
def bound_hub_requests() -> None:
    """Bound every request huggingface_hub sends in this process (once; later calls do nothing).

    huggingface_hub sends its metadata requests without a timeout (``timeout=None`` overrides any default of the
    client) and retries timed-out requests up to five times with back-off. This installs, with
    ``huggingface_hub.set_client_factory``, a client that fills in :func:`hub_timeouts` where a request has none and
    raises :class:`SourceError` (naming the host, the timeout and what to do) at the first timeout. The client keeps
    the event hooks of the session it replaces (offline switch, request ids); a custom transport set with
    ``set_client_factory`` before (e.g. for a proxy certificate) is replaced.
    """
    from huggingface_hub import get_session, set_client_factory

    session = get_session()
    hooks, follow_redirects = session.event_hooks, session.follow_redirects
    client_class = _bounded_client_class()
    set_client_factory(lambda: client_class(event_hooks=hooks, follow_redirects=follow_redirects, timeout=None))


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


def _has_safetensors(path: Path) -> bool:
    """Whether ``path`` holds weights the reader reads: ``model.safetensors`` or ``model.safetensors.index.json``."""
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _check_weights(path: Path, ref: str, allow_pickle: bool, pickles: list[str] | None = None) -> None:
    """Refuse a snapshot without usable weights; ``pickles`` lists pickle files known to exist remotely."""
    local_pickles = [p.name for p in path.glob("pytorch_model*.bin")]
    if _has_safetensors(path) or (allow_pickle and local_pickles):
        return
    if pickles or local_pickles:
        raise SourceError(
            f"{ref!r} has only pickled weights ({pickles or local_pickles}). deltakit reads safetensors by default "
            "because a pickle can run code when loaded; if you trust this model pass allow_pickle=True "
            "(CLI: --allow-pickle)."
        )
    stray = sorted(p.name for p in path.glob("*.safetensors"))
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
    bound_hub_requests()
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      etag_timeout=constants.HF_HUB_ETAG_TIMEOUT))
        pickles = None
        if not _has_safetensors(path) and not allow_pickle and not constants.HF_HUB_OFFLINE:
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
    except _network_errors() as err:
        raise SourceError(
            f"could not download {ref!r} from {constants.ENDPOINT} ({type(err).__name__}: {err}). Check the network "
            "and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache."
        ) from err
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
        raise SourceError(f"local directory {text!r} does not exist: check the path (a Hub model is 'org/name').")
    return _hub_snapshot(text, allow_pickle)
