"""Stream a Hub checkpoint by byte ranges: its safetensors headers, then one tensor at a time, nothing on disk.

A snapshot resolved with ``resolve(ref, stream=True)`` (:func:`deltakit.sources.resolve`) holds only the small
files (config, card, index, tokenizer) and the pinned commit. :class:`HubTensorReader` reads its weights with HTTP
range requests on ``{HF_ENDPOINT}/{repo}/resolve/{commit}/{file}``, through huggingface_hub's own HTTP client (so
``HF_ENDPOINT``, proxies and the user's login apply; the token is sent in a header and never logged), bounded in
time by :func:`deltakit.hubhttp.bound_hub_requests`:

* per weight file, one request for its first :data:`PREFIX_BYTES` bytes (the header length, the file size from
  ``Content-Range`` and, usually, the whole header); a second one only when the header is larger;
* per tensor, one request for exactly its bytes, into one buffer of its size: the resident memory is one tensor at
  a time, as with :class:`~deltakit.tensors.TensorReader`, and nothing is written to disk.

The rules are :class:`~deltakit.tensors.TensorReader`'s, from the same functions: transformers' choice of files
(``model.safetensors``, else the shards of ``model.safetensors.index.json``), the index's ``weight_map`` rules and
the strict header checks of :mod:`deltakit.safetensors_format`. A file name from the index must stay inside the repo
(no ``..``, no absolute path, no backslash), and the errors are the same :class:`CorruptCheckpointError`.

**Faults.** Every answer must be ``206 Partial Content`` with the ``Content-Range`` asked for and the file size seen
first; more bytes than asked for is an error. A connection that drops mid-body (or a body that ends short) is
resumed from the first missing byte, at most :data:`RETRIES` times, then a :class:`~deltakit.refs.SourceError`
names the repo, the file, the tensor and what to do. A server that stops answering ends the call at its first
timeout (``HF_HUB_DOWNLOAD_TIMEOUT``, :func:`deltakit.hubhttp.hub_timeouts`); timeouts are not retried.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deltakit.hubhttp import bound_hub_requests
from deltakit.refs import Snapshot, SourceError
from deltakit.safetensors_format import Missing, Outside, Problem, show
from deltakit.tensors import (
    TensorInfo,
    TensorReader,
    parse_index,
    read_header,
    shard_entries,
    tensor_infos,
)

__all__ = ["PREFIX_BYTES", "RETRIES", "RETRY_WAIT_S", "HubTensorReader", "open_reader"]

#: Bytes fetched first from each weight file: the header length, and for most checkpoints the whole header.
PREFIX_BYTES = 64 * 1024
#: How many times a range whose connection dropped (or whose body ended short) is resumed before giving up.
RETRIES = 3
#: Seconds waited before the n-th resumption: ``n * RETRY_WAIT_S``.
RETRY_WAIT_S = 0.25

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")


class _NotInRepo(Missing):
    """The file does not exist at the pinned commit (HTTP 404)."""


def _repo_name(name: str) -> str:
    """``name`` from an index, normalized; refused when it could lead outside the repo."""
    norm = posixpath.normpath(name)
    if (not name or "\\" in name or "\0" in name or posixpath.isabs(name) or norm in (".", "..")
            or norm.startswith("../")):
        raise Outside("its name leads outside the model repo")
    return norm


class HubTensorReader:
    """Read the tensors of a Hub checkpoint by HTTP range requests, lazily and strictly, without downloading it.

    The public API is :class:`~deltakit.tensors.TensorReader`'s read side (``names``, ``info``, ``read``, ``files``,
    ``len``, ``in``); the rules are its rules (see the module docstring).

    Args:
        snapshot: a Hub snapshot resolved with ``stream=True``: its folder holds the small files (and the index of a
            sharded checkpoint), ``repo_id`` and ``commit`` say where the weights are.

    Attributes:
        files: the weight files read, as ``snapshot.path / name`` (they do not exist on disk).
        ignored_files: always empty (the repo's other files are not listed).
        requests: HTTP range requests sent so far (resumptions included).
        bytes_read: body bytes received so far.

    Raises:
        SourceError: the snapshot is not a streamed Hub snapshot, offline mode is on, the repo has neither
            ``model.safetensors`` nor an index, or the Hub fails (the message says what to do).
        CorruptCheckpointError: a header or the index breaks the format's rules, or names a file outside the repo.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        from huggingface_hub import constants

        if not (snapshot.kind == "hub" and snapshot.repo_id and snapshot.commit):
            raise SourceError(f"{snapshot.ref!r} is not a Hub snapshot pinned to a commit; only Hub references "
                              "('org/name[@revision]') can be streamed.")
        if constants.HF_HUB_OFFLINE:
            raise SourceError(f"{snapshot.ref!r}: streaming reads the weights from the Hub, but HF_HUB_OFFLINE is set. "
                              "Unset it, or drop --stream (stream=False) to read a downloaded copy.")
        bound_hub_requests()
        self.snapshot, self.folder = snapshot, snapshot.path
        self.repo_id, self.commit = snapshot.repo_id, snapshot.commit
        self.requests = self.bytes_read = 0
        self.ignored_files: list[Path] = []
        self._infos: dict[str, TensorInfo] = {}
        self._sizes: dict[str, int] = {}
        try:  # transformers' order: model.safetensors first, else the index
            with self._blame(_WEIGHTS, probe=True):
                prefix, size = self._fetch(_WEIGHTS, 0, PREFIX_BYTES, "its first bytes", up_to=True)
            names, weight_map = [_WEIGHTS], None
            self._index_file(_WEIGHTS, None, prefix, size)
        except _NotInRepo:
            if not (self.folder / _INDEX).is_file():
                raise SourceError(f"{snapshot.ref!r} has neither {_WEIGHTS} nor {_INDEX} at commit {self.commit}: "
                                  "there are no safetensors weights to stream.") from None
            with self._blame(_INDEX):
                weight_map = parse_index((self.folder / _INDEX).read_bytes())
                names = sorted({_repo_name(n) for n in weight_map.values()})
                weight_map = {k: _repo_name(v) for k, v in weight_map.items()}
            for name in names:
                with self._blame(name):
                    prefix, size = self._fetch(name, 0, PREFIX_BYTES, "its first bytes", up_to=True)
                self._index_file(name, weight_map, prefix, size)
        self.files: list[Path] = [self.folder / n for n in names]

    # -- reading ---------------------------------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return f"{self.repo_id}@{self.commit} (streamed from the Hub)"

    @contextmanager
    def _blame(self, name: str, *, probe: bool = False) -> Iterator[None]:
        """Turn a fault found in file ``name`` into its :class:`CorruptCheckpointError`; with ``probe``, a 404
        passes through (``model.safetensors`` may be absent from a sharded checkpoint)."""
        try:
            yield
        except _NotInRepo:
            if probe:
                raise
            raise _NotInRepo("it does not exist in the repo at this commit").error(name, self._where) from None
        except Problem as problem:
            raise problem.error(name, self._where) from None

    def _index_file(self, name: str, weight_map: dict[str, str] | None, prefix: bytearray, size: int) -> None:
        def read(offset: int, nbytes: int, what: str) -> bytes:
            if offset + nbytes <= len(prefix):
                return bytes(prefix[offset:offset + nbytes])
            return bytes(self._fetch(name, offset, nbytes, what, file_size=size)[0])

        with self._blame(name):
            data_start, entries = read_header(size, read)
            entries = shard_entries(entries, weight_map, name)
        self._sizes[name] = size
        self._infos.update(tensor_infos(entries, data_start, self.folder / name))

    def _fetch(self, file: str, start: int, size: int, what: str, *, file_size: int | None = None,
               up_to: bool = False) -> tuple[bytearray, int]:
        """Bytes ``[start, start + size)`` of ``file`` and the file's size, resuming a dropped body.

        Args:
            file_size: the file's size seen first; an answer for another size means the file changed.
            up_to: accept fewer bytes when the file ends first (the first request of a file).

        Raises:
            SourceError: an answer that breaks the range protocol, or drops past :data:`RETRIES` resumptions.
            _NotInRepo: HTTP 404.
        """
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        from deltakit.hubhttp import hub_network_errors

        url = hf_hub_url(self.repo_id, file, revision=self.commit)
        buf, done, drops, total = bytearray(size), 0, 0, file_size
        where = f"{what} of {show(file)} from {self.repo_id}@{self.commit}"
        while True:
            first, last = start + done, start + size - 1
            headers = {**build_hf_headers(), "Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"}
            self.requests += 1
            try:
                with get_session().stream("GET", url, headers=headers) as response:
                    total, end = self._check_answer(response, first, last, total, up_to, where)
                    if end < last:  # up_to: the file ends first
                        size = end - start + 1
                        del buf[size:]
                    for chunk in response.iter_bytes():
                        if done + len(chunk) > size:
                            raise SourceError(
                                f"the Hub sent more bytes than asked for ({size:,}) for {where}; the answer is "
                                "refused. The server or a proxy rewrites range requests: drop --stream "
                                "(stream=False) to download the checkpoint instead.")
                        buf[done:done + len(chunk)] = chunk
                        done += len(chunk)
                        self.bytes_read += len(chunk)
                last_error = "the body ended short"
            except hub_network_errors() as err:  # a dropped connection; timeouts are SourceErrors and end the call
                last_error = f"{type(err).__name__}: {err}"
            if done == size:
                return buf, total if total is not None else 0
            drops += 1
            if drops > RETRIES:
                raise SourceError(
                    f"could not stream {where}: the connection dropped {drops} times before all {size:,} bytes "
                    f"arrived (got {done:,}; last: {last_error}). Retry; if it persists, check the network and "
                    "HF_ENDPOINT, or drop --stream (stream=False) to download the checkpoint instead.")
            time.sleep(RETRY_WAIT_S * drops)

    @staticmethod
    def _check_answer(response: Any, first: int, last: int, total: int | None, up_to: bool,
                      where: str) -> tuple[int, int]:
        """(file size, last byte sent) of a valid answer to ``Range: bytes=first-last``; raises otherwise."""
        status = response.status_code
        if status == 416 and up_to and (m := _UNSATISFIED.fullmatch(response.headers.get("Content-Range", ""))):
            size = int(m.group(1))
            if first >= size:  # an empty file: nothing to send
                return size, first - 1
        if status == 206:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if m is None:
                raise SourceError(f"the Hub answered a range request for {where} without a valid Content-Range; "
                                  "drop --stream (stream=False) to download the checkpoint instead.")
            got_first, got_last, size = map(int, m.groups())
            want_last = min(last, size - 1) if up_to else last
            if total is not None and size != total:
                raise SourceError(f"{where}: the file is now {size:,} bytes, not {total:,} as when its header was "
                                  "read; it changed during the run. Retry.")
            if (got_first, got_last) != (first, want_last):
                raise SourceError(f"the Hub answered bytes {got_first}-{got_last} to a request for bytes "
                                  f"{first}-{want_last} of {where}; the answer is refused. Drop --stream "
                                  "(stream=False) to download the checkpoint instead.")
            return size, got_last
        if status == 404:
            raise _NotInRepo("it does not exist in the repo at this commit")
        if status == 200:
            raise SourceError(f"the Hub ignored the byte range asked for {where} (it answered the whole file): "
                              "this endpoint cannot stream; drop --stream (stream=False) to download the checkpoint.")
        if status in (401, 403):
            raise SourceError(f"the Hub refused access to {where} (HTTP {status}): accept the model's terms on the "
                              "Hub and log in (`hf auth login`), then retry.")
        raise SourceError(f"the Hub answered HTTP {status} for {where}. Retry later, or drop --stream "
                          "(stream=False) to download the checkpoint instead.")

    # -- public API ------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names, in checkpoint order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Metadata of one tensor, from its header (no data read).

        Raises:
            KeyError: the checkpoint has no tensor of that name.
        """
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self._where} ({len(self._infos)} tensors)") from None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype, with one range request for exactly its bytes (plus resumptions).

        Raises:
            KeyError: unknown name.
            SourceError: the Hub fails (see the module docstring).
        """
        info = self.info(name)
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        file = info.file.relative_to(self.folder).as_posix()
        with self._blame(file):
            buf, _ = self._fetch(file, info.start, info.nbytes, f"tensor {show(name)}", file_size=self._sizes[file])
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos


def open_reader(snapshot: Snapshot, *, allow_pickle: bool = False) -> TensorReader | HubTensorReader:
    """The reader of a snapshot: by range requests when it was resolved with ``stream=True``, else from its folder.

    Args:
        snapshot: a resolved snapshot (:func:`deltakit.sources.resolve`).
        allow_pickle: passed to :class:`~deltakit.tensors.TensorReader` (streaming reads safetensors only).
    """
    if snapshot.streamed:
        return HubTensorReader(snapshot)
    return TensorReader(snapshot.path, allow_pickle=allow_pickle)
