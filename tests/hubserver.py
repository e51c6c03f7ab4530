"""A local, in-memory Hugging Face Hub for tests.

deltakit's tests cannot reach huggingface.co. The unmodified ``huggingface_hub`` client (and ``transformers`` and
``datasets``, which download through it) reads its server address from ``HF_ENDPOINT``, so pointing that variable at
this server on 127.0.0.1 exercises the real download, cache, revision-pinning and search code paths offline.

The server implements the part of the Hub's HTTP API that those clients call:

- repo info (``/api/{models,datasets,spaces}/{id}[/revision/{rev}]``), file trees, ``paths-info``, refs and commits;
- file downloads (``/{id}/resolve/{rev}/{path}``, with ``/datasets/`` and ``/spaces/`` prefixes) with the headers
  ``hf_hub_download`` depends on (``X-Repo-Commit``, a quoted ``ETag``, an exact ``Content-Length``) and byte ranges;
- repo search (``/api/models?search=&author=&filter=&sort=&limit=``) with the tags the Hub derives from a model card,
  notably ``base_model:<id>`` and ``base_model:<relation>:<id>``, which is how fine-tunes of a base model are found;
- the ``X-Error-Code`` header that the client maps onto ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and
  ``EntryNotFoundError``;
- commits over HTTP, as ``HfApi.create_repo`` and ``HfApi.upload_folder`` send them: ``POST /api/repos/create``,
  ``POST /api/validate-yaml``, ``POST /api/{type}/{id}/preupload/{rev}`` (every file is answered ``"regular"``, so
  no LFS or Xet upload is ever asked for) and ``POST /api/{type}/{id}/commit/{rev}`` (an NDJSON body: a ``header``
  line, then ``file`` lines with base64 content and ``deletedFile`` / ``deletedFolder`` lines), committed through
  :meth:`LocalHub.commit`.

Repos behave like git: every commit is an immutable snapshot named by a 40-hex sha, branches and tags point at
commits, so pinning a download to a branch, a tag or a sha gives the same results as on the Hub. ETags follow the Hub:
the git blob sha-1 for regular files, the sha-256 of the content for LFS files.

Faults for streaming tests: :meth:`LocalHub.faulty_downloads` makes the downloads of one file drop the connection
mid-body, stall, ignore ``Range`` or send too many bytes while a ``with`` block runs.

Content is published from Python (:meth:`LocalHub.commit`, :meth:`LocalHub.upload_folder`) or over HTTP with the
unmodified client (regular uploads only). Not implemented, on purpose: LFS and Xet uploads, authentication (any
token or none is accepted), private or gated repos, pull requests, pagination (the repos are small) and Xet
downloads (the server never sends Xet headers, so clients fall back to plain HTTP downloads).

Example::

    hub = LocalHub()
    os.environ["HF_ENDPOINT"] = hub.start()   # before huggingface_hub is imported: it reads the variable once
    hub.commit("org/tiny", {"config.json": b"{}"})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import yaml

__all__ = ["FAULT_KINDS", "DownloadFault", "LocalHub"]

# Repo type (as in the Python API) -> the plural used in URLs.
_REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
_TYPE_OF_PLURAL = {plural: repo_type for repo_type, plural in _REPO_TYPES.items()}

# Files stored with git LFS on the Hub (its default .gitattributes covers these suffixes, and the Hub rejects plain
# git files above 10 MB). LFS changes the ETag (sha-256 instead of git sha-1) and adds an "lfs" block to listings.
_LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".pt")
_LFS_MIN_SIZE = 10 * 1024 * 1024

_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_FRONT_MATTER_RE = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Words after /api/{type}/{id}/ that name a sub-route, so "/api/models/a/tree/main" is repo "a", not "a/tree".
_SUBROUTES = frozenset({"revision", "tree", "refs", "commits", "paths-info"})
# The sub-routes of an HTTP commit: POST /api/{type}/{id}/preupload/{rev} and POST /api/{type}/{id}/commit/{rev}.
_WRITE_ROUTES = frozenset({"preupload", "commit"})
_AUTHOR = "deltakit-tests"


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a file: sha-1 over ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _now() -> str:
    """The current UTC time in the Hub's format (``2024-01-31T12:00:00.000Z``, which the client parses)."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class _Blob:
    """One file's content and the ids the Hub reports for it."""

    data: bytes
    oid: str  # git object id: of the content, or of the LFS pointer file for LFS files (as git stores the pointer)
    lfs_sha256: str | None = None
    pointer_size: int | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        # hf_hub_download names the cached blob after the ETag: sha-256 for LFS files, git sha-1 otherwise.
        return self.lfs_sha256 or self.oid


def _make_blob(path: str, data: bytes) -> _Blob:
    if not (path.endswith(_LFS_SUFFIXES) or len(data) > _LFS_MIN_SIZE):
        return _Blob(data, _git_blob_oid(data))
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    return _Blob(data, _git_blob_oid(pointer), sha256, len(pointer))


@dataclass(frozen=True)
class _Commit:
    """An immutable snapshot of a repo. ``last_change`` maps each path to the sha of the commit that last wrote it."""

    sha: str
    parent: str | None
    seq: int  # global creation order; sorts commits and repos by time even within one millisecond
    title: str
    message: str
    date: str
    files: Mapping[str, _Blob]
    last_change: Mapping[str, str]
    card_data: dict | None
    tags: tuple[str, ...]
    safetensors: dict | None  # {"parameters": {dtype: count}, "total": n}, as the Hub reports it
    config: dict | None  # the Hub's short summary of config.json


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    created_at: str
    created_seq: int
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def object_id(self) -> str:
        # The Hub's "_id" is a 24-hex database id; derive a stable one.
        return hashlib.sha1(f"{self.repo_type}/{self.repo_id}".encode()).hexdigest()[:24]

    @property
    def author(self) -> str | None:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else None

    def resolve(self, revision: str) -> _Commit | None:
        """The commit a branch, a tag, a full sha, ``refs/heads/<b>`` or ``refs/tags/<t>`` points at, else None."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix):
                sha = refs.get(revision[len(prefix) :])
                return self.commits[sha] if sha else None
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and _SHA_RE.match(revision):
            sha = revision
        return self.commits.get(sha) if sha else None

    def history(self, commit: _Commit) -> list[_Commit]:
        """``commit`` and its ancestors, newest first."""
        out = [commit]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out


@dataclass
class _Response:
    status: int
    body: bytes | memoryview = b""
    headers: dict[str, str] = field(default_factory=dict)
    # A fault (LocalHub.faulty_downloads): send this many bytes of the body, then go silent for `stall_s` seconds
    # and drop the connection. Content-Length still announces the whole body.
    cut_after: int | None = None
    stall_s: float = 0.0


#: What LocalHub.faulty_downloads can do to a download.
FAULT_KINDS = ("drop", "stall", "whole", "extra")


@dataclass
class DownloadFault:
    """A fault injected into downloads of one file (see :meth:`LocalHub.faulty_downloads`); ``hits`` counts them."""

    repo_id: str
    path: str
    kind: str
    after: int = 0
    times: int | None = None
    from_byte: int = 0
    stall_s: float = 30.0
    hits: int = 0

    def applies(self, repo_id: str, path: str, start: int) -> bool:
        return (repo_id, path) == (self.repo_id, self.path) and start >= self.from_byte and (
            self.times is None or self.hits < self.times)


def _json(payload: object, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    body = json.dumps(payload).encode()
    return _Response(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


def _hub_error(status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None) -> _Response:
    """An error the client can type: ``hf_raise_for_status`` maps ``X-Error-Code`` onto its exception classes."""
    extra = dict(headers or {})
    if code is not None:
        extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
    return _json({"error": message}, status, extra)


def _not_found() -> _Response:
    return _Response(404, b"Not Found", {"Content-Type": "text/plain; charset=utf-8"})


def _is_true(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true", "yes")


def _as_list(value: object) -> list[str]:
    """A card field that may be a string or a list of strings, as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value if item is not None]
    return [str(value)]


def _parse_card(text: str, where: str) -> dict | None:
    """The YAML front matter of a README, made JSON-safe (YAML dates become strings), or None if it has none."""
    match = _FRONT_MATTER_RE.match(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: the README.md front matter is not valid YAML ({exc}); fix the header.") from exc
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(
            f"{where}: the README.md front matter must be a YAML mapping, got {type(data).__name__}; "
            "write it as 'key: value' lines between '---' markers."
        )
    return json.loads(json.dumps(data, default=str))


def _derive_tags(card: dict | None, files: Mapping[str, _Blob], where: str) -> tuple[str, ...]:
    """The tags the Hub attaches to a repo: the card's own tags plus tags derived from card fields and files.

    ``base_model`` (a string or a list) yields ``base_model:<id>`` and ``base_model:<relation>:<id>``. The relation is
    the card's ``base_model_relation`` if given, else ``adapter`` when the repo holds an ``adapter_config.json`` (a PEFT
    adapter, as the Hub infers), else ``finetune``.
    """
    card = card or {}
    tags: list[str] = []
    tags += _as_list(card.get("library_name"))
    tags += _as_list(card.get("tags"))
    tags += _as_list(card.get("pipeline_tag"))
    tags += [f"dataset:{name}" for name in _as_list(card.get("datasets"))]
    tags += [f"license:{name}" for name in _as_list(card.get("license"))]
    base_models = _as_list(card.get("base_model"))
    if base_models:
        relation = card.get("base_model_relation")
        if relation is None:
            relation = "adapter" if "adapter_config.json" in files else "finetune"
        if relation not in _BASE_MODEL_RELATIONS:
            raise ValueError(
                f"{where}: base_model_relation {relation!r} is not one of {list(_BASE_MODEL_RELATIONS)}; "
                "fix the README.md front matter or leave the field out."
            )
        for base in base_models:
            tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
    if any(path.endswith(".safetensors") for path in files):
        tags.append("safetensors")
    return tuple(dict.fromkeys(tags))  # unique, first occurrence wins


def _safetensors_summary(files: Mapping[str, _Blob]) -> dict | None:
    """Parameter counts per dtype over all ``*.safetensors`` files, read from their headers (as the Hub reports).

    A safetensors file starts with an 8-byte little-endian header length and a JSON header mapping tensor names to
    ``{"dtype", "shape", "data_offsets"}``. Files whose header does not parse are left out, as the Hub does.
    """
    counts: dict[str, int] = {}
    found = False
    for path, blob in files.items():
        if not path.endswith(".safetensors") or blob.size < 8:
            continue
        (length,) = struct.unpack("<Q", blob.data[:8])
        try:
            header = json.loads(blob.data[8 : 8 + length])
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(header, dict):
            continue
        found = True
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in tensor["shape"]:
                numel *= int(dim)
            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + numel
    return {"parameters": counts, "total": sum(counts.values())} if found else None


def _config_summary(files: Mapping[str, _Blob]) -> dict | None:
    """The Hub's short ``config`` block (architectures and model_type) from config.json, if it parses."""
    blob = files.get("config.json")
    if blob is None:
        return None
    try:
        config = json.loads(blob.data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    return {key: config[key] for key in ("architectures", "model_type") if key in config}


def _check_repo_type(repo_type: str) -> str:
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type {repo_type!r} is not one of {list(_REPO_TYPES)}; pass one of them.")
    return repo_type


def _check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(
            f"repo_id {repo_id!r} is not a Hub repo id; use 'name' or 'org/name' made of letters, digits, '-', '_' "
            "and '.', without '--' or '..'."
        )
    return repo_id


def _check_path(path: str) -> str:
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"file path {path!r} is not a relative POSIX path inside the repo; use names like 'config.json' or "
            "'data/train-00000-of-00001.parquet' (no leading '/', no '..', no empty parts)."
        )
    return path


def _check_ref_name(name: str, kind: str) -> str:
    if not isinstance(name, str) or not name or name != name.strip() or _SHA_RE.match(name) or ".." in name:
        raise ValueError(
            f"{kind} name {name!r} is not usable; use a non-empty name without surrounding spaces or '..' that is "
            "not a 40-hex string (those are read as commit shas)."
        )
    return name


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """The inclusive byte range a ``Range`` header asks for, None to send the whole file, "unsatisfiable" for 416.

    Supports ``bytes=N-``, ``bytes=N-M`` and ``bytes=-K`` (the last K bytes). Multi-range requests are answered
    with the whole file, which HTTP allows.
    """
    match = _RANGE_RE.match(value.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):
        suffix = int(match.group(2))
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(match.group(1))
    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end


class LocalHub:
    """An in-memory Hugging Face Hub served over HTTP on localhost, for tests.

    Repos are created and filled from Python, or over HTTP by huggingface_hub's ``create_repo`` and ``upload_folder``
    (regular uploads, committed through :meth:`commit`). All state sits behind one lock, so the server's handler
    threads (``snapshot_download`` downloads with 8) always see whole commits.

    Attributes:
        requests: how many HTTP requests the server has answered since this object was created; tests read it
            before and after a call to prove the call did (or did not) contact the server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._seq = 0
        self._requests = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self._faults: list[DownloadFault] = []

    # ------------------------------------------------------------------ server lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving in a daemon thread.

        Args:
            host: address to bind; keep the loopback default so nothing outside the machine can reach it.
            port: TCP port; 0 lets the OS pick a free one.

        Returns:
            The endpoint URL, e.g. ``http://127.0.0.1:54321``, to export as ``HF_ENDPOINT``.

        Raises:
            RuntimeError: if the server is already running.
        """
        if self._server is not None:
            raise RuntimeError(f"LocalHub is already serving at {self._url}; call stop() before starting it again.")
        server = _Server((host, port), _Handler)
        server.hub = self
        bound_host, bound_port = server.server_address[:2]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="deltakit-local-hub", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        self._url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
        return self._url

    def stop(self) -> None:
        """Stop serving and close every open connection (clients keep idle keep-alive connections in a pool).

        Repos are kept, so the hub can be started again. Stopping a hub that is not running does nothing.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        self._server = self._thread = self._url = None

    @property
    def url(self) -> str:
        """The endpoint URL of the running server.

        Raises:
            RuntimeError: if the server is not running.
        """
        if self._url is None:
            raise RuntimeError("LocalHub is not serving; call start() first.")
        return self._url

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @contextlib.contextmanager
    def faulty_downloads(self, repo_id: str, path: str, kind: str, *, after: int = 0, times: int | None = None,
                         from_byte: int = 0, stall_s: float = 30.0) -> Iterator[DownloadFault]:
        """Misbehave on downloads (``GET .../resolve/...``) of one file while the context is open.

        Args:
            repo_id / path: the file (any revision).
            kind: ``drop``: send the headers (Content-Length announcing the whole body) and ``after`` bytes of the
                body, then close the connection. ``stall``: the same, then stay silent for ``stall_s`` seconds
                before closing. ``whole``: ignore ``Range`` and answer 200 with the whole file. ``extra``: answer
                the range with ``after`` bytes too many (Content-Length counting them).
            times: fault this many downloads, then answer normally (None: every one).
            from_byte: fault only downloads whose range starts at or after this byte (e.g. the data of a tensor,
                not the header).
            stall_s: how long a ``stall`` stays silent.

        Yields:
            The fault; its ``hits`` counts the downloads it changed.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; kinds: {', '.join(FAULT_KINDS)}")
        fault = DownloadFault(repo_id, path, kind, after, times, from_byte, stall_s)
        with self._lock:
            self._faults.append(fault)
        try:
            yield fault
        finally:
            with self._lock:
                self._faults.remove(fault)

    # ------------------------------------------------------------------ publishing

    def create_repo(self, repo_id: str, repo_type: str = "model", *, exist_ok: bool = False) -> None:
        """Create an empty repo whose ``main`` branch holds one empty initial commit.

        Args:
            repo_id: ``name`` or ``org/name``.
            repo_type: ``model``, ``dataset`` or ``space``.
            exist_ok: if True, an existing repo is left as it is instead of raising.

        Raises:
            ValueError: if the id or type is malformed, or the repo exists and ``exist_ok`` is False.
        """
        key = (_check_repo_type(repo_type), _check_repo_id(repo_id))
        with self._lock:
            if key in self._repos:
                if exist_ok:
                    return
                raise ValueError(f"{repo_type} repo {repo_id!r} already exists; pass exist_ok=True to reuse it.")
            self._create_locked(repo_type, repo_id)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Upload files",
        delete: Iterable[str] = (),
    ) -> str:
        """Add a commit: the branch's previous snapshot, minus ``delete``, plus (or overwritten by) ``files``.

        The repo is created if it does not exist yet, and the branch (from ``main``'s head) if it is new.

        Args:
            repo_id: ``name`` or ``org/name``.
            files: path in the repo (``"/"``-separated) -> content, as bytes or a local file to read now.
            repo_type: ``model``, ``dataset`` or ``space``.
            branch: the branch to commit to.
            message: commit message; its first line is the title, the rest the description.
            delete: paths to remove first; a directory path removes everything under it.

        Returns:
            The new commit's sha (40 lowercase hex digits).

        Raises:
            ValueError: on a malformed id, type, branch or path, or a README.md whose YAML front matter is invalid.
            TypeError: if a file's content is neither bytes nor a Path.
            KeyError: if a path in ``delete`` does not exist on the branch.
        """
        _check_repo_type(repo_type)
        _check_repo_id(repo_id)
        _check_ref_name(branch, "branch")
        contents: dict[str, bytes] = {}
        for path, content in files.items():
            _check_path(path)
            if isinstance(content, Path):
                contents[path] = content.read_bytes()
            elif isinstance(content, (bytes, bytearray, memoryview)):
                contents[path] = bytes(content)
            else:
                raise TypeError(f"content of {path!r} is a {type(content).__name__}; pass bytes or a pathlib.Path.")
        blobs = {path: _make_blob(path, data) for path, data in contents.items()}
        to_delete = [path.rstrip("/") for path in delete]
        title, _, description = message.partition("\n")
        where = f"{repo_type} repo {repo_id!r}"

        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            # A new branch starts from main's head.
            head = repo.commits[repo.branches.get(branch) or repo.branches["main"]] if repo is not None else None
            new_files = dict(head.files) if head else {}
            for path in to_delete:
                under = [p for p in new_files if p == path or p.startswith(path + "/")]
                if not under:
                    raise KeyError(
                        f"cannot delete {path!r} from {where} branch {branch!r}: no such file or directory; "
                        f"existing files: {sorted(new_files)}."
                    )
                for p in under:
                    del new_files[p]
            changed = [path for path, blob in blobs.items() if path not in new_files or new_files[path].oid != blob.oid]
            new_files.update(blobs)
            # Validate the card before touching any state, so a bad README leaves the repo as it was.
            card = _parse_card(new_files["README.md"].data.decode("utf-8"), where) if "README.md" in new_files else None
            tags = _derive_tags(card, new_files, where)
            if repo is None:
                repo = self._create_locked(repo_type, repo_id)
                head = repo.commits[repo.branches["main"]]  # the initial commit
            new = self._new_commit_locked(repo, head, title, description.strip(), new_files, changed, card, tags)
            repo.branches[branch] = new.sha
            return new.sha

    def upload_folder(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Upload folder",
    ) -> str:
        """Commit every file under ``folder`` (recursively), at its path relative to ``folder``.

        Args:
            repo_id: ``name`` or ``org/name``.
            folder: local directory, e.g. the output of ``save_pretrained``.
            repo_type: ``model``, ``dataset`` or ``space``.
            branch: the branch to commit to.
            message: commit message.

        Returns:
            The new commit's sha.

        Raises:
            ValueError: if ``folder`` is not a directory or holds no files (plus the errors of :meth:`commit`).
        """
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"folder {str(root)!r} is not a directory; pass the directory to upload.")
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        if not files:
            raise ValueError(f"folder {str(root)!r} holds no files; there is nothing to upload.")
        return self.commit(repo_id, files, repo_type=repo_type, branch=branch, message=message)

    def tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> str:
        """Create a tag pointing at the commit ``revision`` (a branch, tag or sha) resolves to.

        Args:
            repo_id: ``name`` or ``org/name``.
            tag: the new tag's name.
            revision: what to tag.
            repo_type: ``model``, ``dataset`` or ``space``.

        Returns:
            The sha of the tagged commit.

        Raises:
            KeyError: if the repo or revision does not exist.
            ValueError: if the tag name is malformed or already used by a tag or branch.
        """
        _check_ref_name(tag, "tag")
        with self._lock:
            repo = self._repos.get((_check_repo_type(repo_type), repo_id))
            if repo is None:
                raise KeyError(f"{repo_type} repo {repo_id!r} does not exist; create it or commit to it first.")
            if tag in repo.tags or tag in repo.branches:
                raise ValueError(f"{repo_id!r} already has a tag or branch named {tag!r}; pick another tag name.")
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(
                    f"revision {revision!r} not found in {repo_id!r}; branches: {sorted(repo.branches)}, "
                    f"tags: {sorted(repo.tags)}."
                )
            repo.tags[tag] = commit.sha
            return commit.sha

    def _create_locked(self, repo_type: str, repo_id: str) -> _Repo:
        self._seq += 1
        repo = _Repo(repo_type, repo_id, _now(), self._seq)
        initial = self._new_commit_locked(repo, None, "initial commit", "", {}, [], None, ())
        repo.branches["main"] = initial.sha
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _new_commit_locked(
        self,
        repo: _Repo,
        parent: _Commit | None,
        title: str,
        message: str,
        files: dict[str, _Blob],
        changed: list[str],
        card: dict | None,
        tags: tuple[str, ...],
    ) -> _Commit:
        self._seq += 1
        # The sequence number keeps shas unique even for identical content, as git's timestamps do.
        parent_sha = parent.sha if parent else ""
        digest = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}\n{parent_sha}\n{self._seq}\n".encode())
        digest.update(title.encode() + b"\n" + message.encode())
        for path in sorted(files):
            digest.update(f"\n{path}\0{files[path].oid}".encode())
        sha = digest.hexdigest()
        last_change = dict(parent.last_change) if parent else {}
        last_change = {path: last_change[path] for path in files if path in last_change}
        last_change.update({path: sha for path in changed})
        commit = _Commit(
            sha=sha,
            parent=parent_sha or None,
            seq=self._seq,
            title=title,
            message=message,
            date=_now(),
            files=files,
            last_change=last_change,
            card_data=card,
            tags=tags,
            safetensors=_safetensors_summary(files),
            config=_config_summary(files),
        )
        repo.commits[sha] = commit
        return commit

    # ------------------------------------------------------------------ HTTP

    def _handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> _Response:
        """Answer one request. Reads run under the lock; writes take it inside :meth:`commit` and
        :meth:`create_repo`. The response body is written after it is released."""
        if method == "POST":
            written = self._handle_write(target, headers, body)
            if written is not None:
                return written
        with self._lock:
            self._requests += 1
            raw_path, _, raw_query = target.partition("?")
            query = parse_qs(raw_query, keep_blank_values=True)
            # Unquote each segment on its own: revisions and tree paths arrive quoted with "/" as %2F.
            segments = [unquote(part) for part in raw_path.split("/")[1:]]
            while segments and segments[-1] == "":
                segments.pop()
            if len(segments) >= 2 and segments[0] == "api" and segments[1] in _TYPE_OF_PLURAL:
                repo_type = _TYPE_OF_PLURAL[segments[1]]
                if len(segments) == 2:
                    return self._list_repos(repo_type, query) if method in ("GET", "HEAD") else _not_found()
                return self._api_repo(method, repo_type, segments[2:], query, body, headers)
            if method in ("GET", "HEAD"):
                return self._resolve_file(segments, headers)
            return _not_found()

    # ------------------------------------------------------------------ HTTP writes

    def _handle_write(self, target: str, headers: Mapping[str, str], body: bytes) -> _Response | None:
        """Answer a POST that writes (or validates before writing); None for any other request."""
        raw_path, _, raw_query = target.partition("?")
        query = parse_qs(raw_query, keep_blank_values=True)
        segments = [unquote(part) for part in raw_path.split("/")[1:]]
        while segments and segments[-1] == "":
            segments.pop()
        route: tuple | None = None
        if segments == ["api", "repos", "create"]:
            route = ("create",)
        elif segments == ["api", "validate-yaml"]:
            route = ("validate",)
        elif len(segments) in (5, 6) and segments[0] == "api" and segments[1] in _TYPE_OF_PLURAL:
            # [api, models, org, name, commit, rev] or [api, models, name, commit, rev]; the client quotes "/" in rev
            action = segments[-2]
            if action in _WRITE_ROUTES:
                route = (action, _TYPE_OF_PLURAL[segments[1]], "/".join(segments[2:-2]), segments[-1])
        if route is None:
            return None
        with self._lock:
            self._requests += 1
        try:
            form = body.decode("utf-8")
        except UnicodeDecodeError:
            return _json({"error": "The request body is not UTF-8 text."}, 400)
        if route[0] == "create":
            return self._http_create_repo(form)
        if route[0] == "validate":
            return self._http_validate_yaml(form)
        _, repo_type, repo_id, revision = route
        if _is_true(query.get("create_pr")):
            return _json({"error": "Pull requests are not implemented by the local Hub; commit to a branch."}, 400)
        with self._lock:
            found = self._lookup(repo_type, repo_id, revision)
            if isinstance(found, _Response):
                return found
            repo, commit = found
            if revision not in repo.branches:
                return _hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision!r} is not a branch of "
                                  f"{repo_id!r}; commits go to a branch.")
        if route[0] == "preupload":
            return self._http_preupload(commit, form)
        return self._http_commit(repo_type, repo_id, revision, commit, form)

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{_REPO_TYPES[repo_type]}/"
        return f"{self.url}/{prefix}{repo_id}"

    def _http_create_repo(self, form: str) -> _Response:
        """``POST /api/repos/create`` with ``{"name", "organization", "type", "visibility"}``: 409 if it exists."""
        try:
            payload = json.loads(form or "{}")
        except ValueError:
            return _json({"error": "The request body is not JSON."}, 400)
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return _json({"error": "Expected a JSON object with the repo's name."}, 400)
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            return _json({"error": f"Invalid repo type {repo_type!r}; use one of {list(_REPO_TYPES)}."}, 400)
        if payload.get("visibility") not in (None, "public") or payload.get("private"):
            return _json({"error": "Private repos are not implemented by the local Hub; create a public one."}, 400)
        org = payload.get("organization")
        repo_id = f"{org}/{payload['name']}" if org else payload["name"]
        with self._lock:
            exists = (repo_type, repo_id) in self._repos
        if exists:
            url = self._repo_url(repo_type, repo_id)
            return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        try:
            self.create_repo(repo_id, repo_type, exist_ok=True)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        return _json({"url": self._repo_url(repo_type, repo_id), "name": repo_id})

    @staticmethod
    def _http_validate_yaml(form: str) -> _Response:
        """``POST /api/validate-yaml`` with ``{"content", "repoType"}``: the card's front matter, checked as a commit
        checks it."""
        try:
            payload = json.loads(form or "{}")
            content = payload["content"]
            _derive_tags(_parse_card(content, "README.md"), {}, "README.md")
        except (ValueError, KeyError, TypeError) as exc:
            return _json({"errors": [{"message": str(exc)}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    @staticmethod
    def _http_preupload(commit: _Commit, form: str) -> _Response:
        """``POST .../preupload/{rev}``: every file is uploaded as a regular (base64, in-commit) file.

        ``oid`` is the git blob id of the file at that revision, as the client computes it for regular files, so it
        skips files that have not changed.
        """
        try:
            files = json.loads(form or "{}")["files"]
            paths = [_check_path(item["path"]) for item in files]
        except (ValueError, KeyError, TypeError) as exc:
            return _json({"error": f"Expected {{'files': [{{'path', 'sample', 'size'}}]}} ({exc})."}, 400)
        answer = []
        for path in paths:
            blob = commit.files.get(path)
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                           "oid": _git_blob_oid(blob.data) if blob is not None else None})
        return _json({"files": answer, "commitOid": commit.sha})

    def _http_commit(self, repo_type: str, repo_id: str, branch: str, head: _Commit, form: str) -> _Response:
        """``POST .../commit/{rev}``: an NDJSON body (header line, then file / deletedFile / deletedFolder lines)."""
        import base64
        import binascii

        files: dict[str, bytes] = {}
        delete: list[str] = []
        header: dict | None = None
        try:
            for number, line in enumerate(line for line in form.splitlines() if line.strip()):
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if number == 0 and key != "header":
                    raise ValueError("the first line must be the header")
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise ValueError(f"file {value.get('path')!r} is not base64-encoded")
                    files[_check_path(value["path"])] = base64.b64decode(value["content"], validate=True)
                elif key in ("deletedFile", "deletedFolder"):
                    delete.append(_check_path(value["path"].rstrip("/")))
                elif key == "lfsFile":
                    raise ValueError("LFS uploads are not implemented by the local Hub (preupload answers "
                                     "'regular' for every file)")
                else:
                    raise ValueError(f"unknown operation {key!r}")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            return _json({"error": f"Malformed commit payload: {exc}."}, 400)
        if not isinstance(header, dict) or not isinstance(header.get("summary"), str) or not header["summary"]:
            return _json({"error": "The commit header needs a non-empty summary."}, 400)
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and parent and head.sha.startswith(parent)):
            return _json({"error": f"A commit has happened since: {branch!r} is at {head.sha}, not {parent!r}."}, 412)
        message = header["summary"] + ("\n" + header["description"] if header.get("description") else "")
        try:
            sha = self.commit(repo_id, files, repo_type=repo_type, branch=branch, message=message, delete=delete)
        except KeyError as exc:
            return _hub_error(404, "EntryNotFound", str(exc.args[0]) if exc.args else str(exc))
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{sha}"
        return _json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _split_repo_id(self, repo_type: str, segments: list[str]) -> tuple[str, list[str]]:
        """Split ``[org, name, *rest]`` or ``[name, *rest]`` into the repo id and the rest."""
        if len(segments) >= 2 and (repo_type, f"{segments[0]}/{segments[1]}") in self._repos:
            return f"{segments[0]}/{segments[1]}", segments[2:]
        if (repo_type, segments[0]) in self._repos:
            return segments[0], segments[1:]
        if len(segments) >= 2 and segments[1] not in _SUBROUTES:
            return f"{segments[0]}/{segments[1]}", segments[2:]
        return segments[0], segments[1:]

    def _lookup(self, repo_type: str, repo_id: str, revision: str) -> tuple[_Repo, _Commit] | _Response:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            return _hub_error(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id!r}.")
        commit = repo.resolve(revision)
        if commit is None:
            return _hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision!r} in {repo_type} {repo_id!r}.")
        return repo, commit

    def _api_repo(
        self,
        method: str,
        repo_type: str,
        segments: list[str],
        query: dict[str, list[str]],
        body: bytes,
        headers: Mapping[str, str],
    ) -> _Response:
        repo_id, rest = self._split_repo_id(repo_type, segments)
        if (repo_type, repo_id) not in self._repos:
            return _hub_error(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id!r}.")
        read = method in ("GET", "HEAD")
        if read and not rest:
            return self._repo_info(repo_type, repo_id, "main", query)
        if read and len(rest) >= 2 and rest[0] == "revision":
            return self._repo_info(repo_type, repo_id, "/".join(rest[1:]), query)
        if read and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
        if read and rest == ["refs"]:
            return self._refs(self._repos[(repo_type, repo_id)], query)
        if read and len(rest) >= 2 and rest[0] == "commits":
            return self._commits(repo_type, repo_id, "/".join(rest[1:]))
        if method == "POST" and len(rest) >= 2 and rest[0] == "paths-info":
            return self._paths_info(repo_type, repo_id, "/".join(rest[1:]), body, headers)
        return _not_found()

    def _info_dict(self, repo: _Repo, commit: _Commit, *, card: bool, siblings: bool) -> dict:
        info: dict = {"_id": repo.object_id, "id": repo.repo_id}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        info.update(
            author=repo.author,
            sha=commit.sha,
            lastModified=commit.date,
            createdAt=repo.created_at,
            private=False,
            gated=False,
            disabled=False,
            downloads=0,
            likes=0,
            trendingScore=0,
            tags=list(commit.tags),
        )
        card_data = commit.card_data or {}
        for key in ("library_name", "pipeline_tag"):
            if key in card_data:
                info[key] = card_data[key]
        if card and commit.card_data is not None:
            info["cardData"] = commit.card_data
        if commit.safetensors is not None:
            info["safetensors"] = commit.safetensors
        if commit.config is not None:
            info["config"] = commit.config
        if siblings:
            info["siblings"] = [self._sibling(path, commit.files[path]) for path in sorted(commit.files)]
        return info

    @staticmethod
    def _sibling(path: str, blob: _Blob) -> dict:
        sibling: dict = {"rfilename": path, "size": blob.size, "blobId": blob.oid}
        if blob.lfs_sha256 is not None:
            sibling["lfs"] = {"sha256": blob.lfs_sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        return sibling

    @staticmethod
    def _apply_expand(info: dict, query: dict[str, list[str]]) -> dict:
        # With ?expand=..., the Hub returns only the requested properties (plus the ids).
        expand = query.get("expand", []) + query.get("expand[]", [])
        if not expand:
            return info
        return {key: value for key, value in info.items() if key in ("_id", "id") or key in expand}

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> _Response:
        found = self._lookup(repo_type, repo_id, revision)
        if isinstance(found, _Response):
            return found
        info = self._info_dict(*found, card=True, siblings=True)
        return _json(self._apply_expand(info, query))

    def _list_repos(self, repo_type: str, query: dict[str, list[str]]) -> _Response:
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        wanted_tags = query.get("filter", []) + query.get("filter[]", []) + query.get("pipeline_tag", [])
        sort = (query.get("sort") or [None])[0]
        sort_keys = {
            None: None,
            "downloads": None,  # every repo has 0 downloads, likes and trendingScore: keep creation order
            "likes": None,
            "trendingScore": None,
            "lastModified": lambda r: -r.commits[r.branches["main"]].seq,
            "createdAt": lambda r: -r.created_seq,
            "id": lambda r: r.repo_id,
        }
        if sort not in sort_keys:
            return _json({"error": f"Invalid sort {sort!r}; use one of {sorted(k for k in sort_keys if k)}."}, 400)
        limit_values = query.get("limit")
        try:
            limit = int(limit_values[0]) if limit_values else None
        except ValueError:
            return _json({"error": f"Invalid limit {limit_values[0]!r}; use a non-negative integer."}, 400)
        full = _is_true(query.get("full"))
        card = full or _is_true(query.get("cardData"))
        repos = sorted((r for (t, _), r in self._repos.items() if t == repo_type), key=lambda r: r.created_seq)
        if sort_keys[sort] is not None:
            repos.sort(key=sort_keys[sort])
        items = []
        for repo in repos:
            commit = repo.commits[repo.branches["main"]]
            if search and search not in repo.repo_id.lower():
                continue
            if author is not None and repo.author != author:
                continue
            if not all(tag in commit.tags for tag in wanted_tags):
                continue
            info = self._info_dict(repo, commit, card=card, siblings=full)
            items.append(self._apply_expand(info, query))
        return _json(items[:limit] if limit is not None else items)

    def _tree_entries(self, repo: _Repo, commit: _Commit, expand: bool) -> dict[str, dict]:
        """Path -> tree entry for every file and directory of a commit."""

        def last_commit(sha: str) -> dict:
            target = repo.commits[sha]
            return {"id": target.sha, "title": target.title, "date": target.date}

        entries: dict[str, dict] = {}
        members: dict[str, list[str]] = {}  # directory -> the files under it
        for path, blob in commit.files.items():
            entry: dict = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.lfs_sha256 is not None:
                entry["lfs"] = {"oid": blob.lfs_sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            if expand:
                entry["lastCommit"] = last_commit(commit.last_change[path])
            entries[path] = entry
            parts = path.split("/")
            for depth in range(1, len(parts)):
                members.setdefault("/".join(parts[:depth]), []).append(path)
        for directory, paths in members.items():
            oid = hashlib.sha1("\n".join(f"{p}\0{commit.files[p].oid}" for p in sorted(paths)).encode()).hexdigest()
            entry = {"type": "directory", "oid": oid, "size": 0, "path": directory}
            if expand:
                newest = max((commit.last_change[p] for p in paths), key=lambda sha: repo.commits[sha].seq)
                entry["lastCommit"] = last_commit(newest)
            entries[directory] = entry
        return entries

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict[str, list[str]]) -> _Response:
        found = self._lookup(repo_type, repo_id, revision)
        if isinstance(found, _Response):
            return found
        repo, commit = found
        entries = self._tree_entries(repo, commit, _is_true(query.get("expand")))
        if path and entries.get(path, {}).get("type") != "directory":
            return _hub_error(404, "EntryNotFound", f"{path!r} is not a directory of {repo_id!r} at {revision!r}.")
        prefix = path + "/" if path else ""
        recursive = _is_true(query.get("recursive"))
        listed = [
            entry
            for entry_path, entry in sorted(entries.items())
            if entry_path.startswith(prefix) and (recursive or "/" not in entry_path[len(prefix) :])
        ]
        return _json(listed)

    def _paths_info(
        self, repo_type: str, repo_id: str, revision: str, body: bytes, headers: Mapping[str, str]
    ) -> _Response:
        found = self._lookup(repo_type, repo_id, revision)
        if isinstance(found, _Response):
            return found
        if "json" in (headers.get("Content-Type") or ""):
            form = json.loads(body or b"{}")
            paths, expand = _as_list(form.get("paths")), bool(form.get("expand"))
        else:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            paths, expand = form.get("paths", []), _is_true(form.get("expand"))
        entries = self._tree_entries(*found, expand)
        # Unknown paths are left out, as on the Hub.
        return _json([entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    @staticmethod
    def _refs(repo: _Repo, query: dict[str, list[str]]) -> _Response:
        def ref(kind: str, name: str, sha: str) -> dict:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        refs: dict = {
            "branches": [ref("heads", name, sha) for name, sha in sorted(repo.branches.items())],
            "tags": [ref("tags", name, sha) for name, sha in sorted(repo.tags.items())],
            "converts": [],
        }
        if query.get("include_prs"):
            refs["pullRequests"] = []
        return _json(refs)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        found = self._lookup(repo_type, repo_id, revision)
        if isinstance(found, _Response):
            return found
        repo, commit = found
        return _json(
            [
                {"id": c.sha, "title": c.title, "message": c.message, "authors": [{"user": _AUTHOR}], "date": c.date}
                for c in repo.history(commit)
            ]
        )

    def _resolve_file(self, segments: list[str], headers: Mapping[str, str]) -> _Response:
        """``/[datasets/|spaces/]{id}/resolve/{rev}/{path}``: the file, its metadata headers, byte ranges."""
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type, segments = _TYPE_OF_PLURAL[segments[0]], segments[1:]
        if len(segments) >= 4 and segments[2] == "resolve" and (repo_type, segments[0]) not in self._repos:
            repo_id, rest = f"{segments[0]}/{segments[1]}", segments[3:]
        elif len(segments) >= 3 and segments[1] == "resolve":
            repo_id, rest = segments[0], segments[2:]
        else:
            return _not_found()
        if len(rest) < 2:
            return _not_found()
        revision, path = rest[0], "/".join(rest[1:])
        found = self._lookup(repo_type, repo_id, revision)
        if isinstance(found, _Response):
            return found
        _, commit = found
        blob = commit.files.get(path)
        if blob is None:
            # The commit header lets the client cache the miss under .no_exist/<sha>/.
            return _hub_error(
                404,
                "EntryNotFound",
                f"{path!r} does not exist in {repo_id!r} at {revision!r}.",
                {"X-Repo-Commit": commit.sha},
            )
        meta = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        wanted = _parse_range(headers.get("Range") or "", blob.size) if headers.get("Range") else None
        fault = next((f for f in self._faults if f.applies(repo_id, path, wanted[0] if isinstance(wanted, tuple)
                                                            else 0)), None)
        if fault is not None:
            fault.hits += 1
        if wanted == "unsatisfiable":
            return _Response(416, b"", {**meta, "Content-Range": f"bytes */{blob.size}"})
        if wanted is None or (fault is not None and fault.kind == "whole"):
            return _Response(200, memoryview(blob.data), meta)
        start, end = wanted
        response = _Response(
            206, memoryview(blob.data)[start : end + 1], {**meta, "Content-Range": f"bytes {start}-{end}/{blob.size}"}
        )
        if fault is not None and fault.kind == "extra":
            response.body = bytes(response.body) + b"\0" * fault.after
        elif fault is not None:  # drop, stall
            response.cut_after = fault.after
            response.stall_s = fault.stall_s if fault.kind == "stall" else 0.0
        return response


class _Server(ThreadingHTTPServer):
    """A threading server that tracks its connections so :meth:`LocalHub.stop` can close idle keep-alive ones."""

    daemon_threads = True
    block_on_close = False  # stop() closes the connections itself; never wait on a client's idle pool
    hub: LocalHub

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.stopping = threading.Event()  # ends the silence of stalled responses when the server stops

    def track(self, connection: socket.socket, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        self.stopping.set()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-response (or stop() closing its socket) is normal; anything else is a bug.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    # Send each write at once: with Nagle's algorithm the body waits for the ACK of the headers, which the client
    # delays by ~40 ms, so every small request (a byte range, a HEAD) would cost 40 ms on localhost.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        super().finish()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""  # always drain the body to keep the connection in sync
        try:
            response = self.server.hub._handle(method, self.path, self.headers, body)
        except Exception:  # a server bug must reach the test as an HTTP error, not as a hung client
            response = _json({"error": traceback.format_exc()}, 500)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        # On HEAD, Content-Length announces the size a GET would send (hf_hub_download reads the file size from it).
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD" and response.cut_after is not None:  # a fault: part of the body, then hang up
            self.wfile.write(response.body[: response.cut_after])
            self.wfile.flush()
            if response.stall_s:
                self.server.stopping.wait(response.stall_s)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if method != "HEAD" and len(response.body):
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: test output should not be flooded with one line per request."""
