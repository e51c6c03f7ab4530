"""Streaming from a hostile or failing Hub: every case recovers within its bound or ends in a clear error, in time.

The checkpoints are written here (a few hundred KB) and published to the session's local Hub; its
``faulty_downloads`` drops, stalls or garbles the range requests of one file while a case runs.
"""

from __future__ import annotations

import itertools
import json
import struct
import time

import pytest
import torch
from safetensors.torch import save

from deltakit.hubstream import RETRIES, HubTensorReader
from deltakit.sources import SourceError, resolve
from deltakit.tensors import CorruptCheckpointError

pytestmark = pytest.mark.timeout(60)
BOUND_S = 20.0  # the longest any case may take
_repos = itertools.count()
CONFIG = {"config.json": b'{"model_type": "bert"}'}
SECRET = "hf_SECRETTOKENabcdefghij"


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(256, 256, generator=g), "b.weight": torch.randn(64, generator=g)}


def _publish(hub, files: dict[str, bytes]) -> str:
    repo = f"hostile-stream{next(_repos)}/model"
    hub.commit(repo, {**CONFIG, **files})
    return repo


def _raw(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _data_start(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


@pytest.fixture
def good(local_hub, hf_home) -> tuple[str, bytes]:
    blob = save(_weights())
    return _publish(local_hub, {"model.safetensors": blob}), blob


def test_a_connection_dropped_mid_tensor_is_resumed(local_hub, good):
    repo, blob = good
    reader = HubTensorReader(resolve(repo, stream=True))
    with local_hub.faulty_downloads(repo, "model.safetensors", "drop", after=1000, times=RETRIES,
                                    from_byte=_data_start(blob)) as fault:
        start = time.monotonic()
        got = reader.read("a.weight")
    assert got.equal(_weights()["a.weight"])
    assert fault.hits == RETRIES and reader.requests == 1 + RETRIES + 1  # header, the drops, the rest
    # each resumption asked only for the missing bytes: 1000 bytes per drop, then the remainder, nothing twice
    assert reader.bytes_read - len(blob[:65536]) == got.numel() * 4
    assert time.monotonic() - start < BOUND_S


def test_a_connection_dropped_every_time_is_a_clear_error(local_hub, good, monkeypatch):
    repo, blob = good
    monkeypatch.setenv("HF_TOKEN", SECRET)  # sent with every request, never shown
    reader = HubTensorReader(resolve(repo, stream=True))
    start = time.monotonic()
    with local_hub.faulty_downloads(repo, "model.safetensors", "drop", after=1000, from_byte=_data_start(blob)):
        with pytest.raises(SourceError) as err:
            reader.read("a.weight")
    message = str(err.value)
    for fragment in ("tensor 'a.weight'", "'model.safetensors'", repo, f"dropped {RETRIES + 1} times",
                     "Retry", "check the network", "drop --stream"):
        assert fragment in message, message
    assert SECRET not in message and SECRET not in repr(err.value.__cause__)
    assert time.monotonic() - start < BOUND_S


@pytest.mark.parametrize("where", ["header", "tensor"])
def test_a_server_that_stops_answering_ends_at_the_timeout(local_hub, good, monkeypatch, where):
    """Silence after the response headers (header: the first bytes; tensor: mid-body) is not retried."""
    repo, blob = good
    snap = resolve(repo, stream=True)
    reader = HubTensorReader(snap) if where == "tensor" else None
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    start = time.monotonic()
    with local_hub.faulty_downloads(repo, "model.safetensors", "stall", after=1000 if reader else 0,
                                    from_byte=_data_start(blob) if reader else 0, stall_s=BOUND_S) as fault:
        with pytest.raises(SourceError, match=r"did not answer within 1 s.*raise HF_HUB_DOWNLOAD_TIMEOUT"):
            reader.read("a.weight") if reader else HubTensorReader(snap)
    assert fault.hits == 1 and time.monotonic() - start < 10


@pytest.mark.parametrize(("kind", "expect"), [
    ("whole", r"ignored the byte range asked for tensor 'a.weight'.*drop --stream"),
    ("extra", r"sent more bytes than asked for \(262,144\) for tensor 'a.weight'.*refused"),
])
def test_an_answer_of_the_wrong_size_is_refused(local_hub, good, kind, expect):
    repo, blob = good
    reader = HubTensorReader(resolve(repo, stream=True))
    with local_hub.faulty_downloads(repo, "model.safetensors", kind, after=7, from_byte=_data_start(blob)):
        with pytest.raises(SourceError, match=expect):
            reader.read("a.weight")


HEADER = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()


@pytest.mark.parametrize(("files", "expect"), [
    ({"model.safetensors": _raw(HEADER, b"\0" * 8, length=10_000)},
     r"'model.safetensors' in .*@[0-9a-f]{40} \(streamed from the Hub\) is truncated .*ends inside its header"),
    ({"model.safetensors": _raw(HEADER, b"\0" * 8, length=200_000_000)},
     r"not a valid safetensors file \(its header length exceeds the format's limit"),
    ({"model.safetensors": _raw(HEADER, b"\0" * 4)}, r"is truncated .*ends before the data of its last tensor"),
    ({"model.safetensors": _raw(HEADER, b"\0" * 12)}, r"not a valid safetensors file \(unused bytes follow"),
    ({"model.safetensors": _raw(b"[1, 2]")}, r"not a valid safetensors file \(the header is a JSON list"),
    ({"model.safetensors": b"\1\0"}, r"truncated .*ends inside the 8-byte header length"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"w": "../other/model.safetensors"}}).encode()},
     r"'model.safetensors.index.json' .* is refused \(its name leads outside the model repo\)"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"w": "/etc/passwd"}}).encode()},
     r"is refused \(its name leads outside the model repo\)"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"w": "shard.safetensors"}}).encode()},
     r"'shard.safetensors' in .* is missing or incomplete \(it does not exist in the repo"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"w": "shard.safetensors", "v": "shard.safetensors"}}
                                                 ).encode(), "shard.safetensors": _raw(HEADER, b"\0" * 8)},
     r"'shard.safetensors' .* does not hold 1 of the tensors the index lists in it, e.g. 'v'"),
    ({"model.safetensors.index.json": b'{"weight_map": {}}'}, r"weight_map is not a non-empty object"),
], ids=["header-past-the-end", "header-over-the-limit", "data-short", "data-long", "header-not-object",
        "shorter-than-8-bytes", "index-dotdot", "index-absolute", "index-missing-shard", "shard-without-tensor",
        "index-empty"])
def test_a_hostile_checkpoint_is_refused_before_any_tensor_is_read(local_hub, hf_home, files, expect):
    repo = _publish(local_hub, files)
    snap = resolve(repo, stream=True)
    before = local_hub.requests
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match=expect):
        HubTensorReader(snap)
    assert local_hub.requests - before <= 4  # the first bytes, perhaps the header; never a tensor, never a loop
    assert time.monotonic() - start < BOUND_S


def test_streaming_needs_a_hub_snapshot(tiny):
    with pytest.raises(SourceError, match=r"is not a Hub snapshot pinned to a commit; only Hub references"):
        HubTensorReader(resolve("family:tiny/base"))
