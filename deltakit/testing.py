"""Synthetic Llama checkpoints at real scale: a base and N fine-tunes written as Hub-style folders, from a seed.

What for: measuring how deltakit scales (memory, time, read throughput) on models the size of real ones -- 0.5B,
1.5B, 7B parameters -- without downloading any, and unit-testing the readers on a tiny one. Each folder is what
``save_pretrained`` of a ``transformers.LlamaForCausalLM`` in bf16 gives: ``config.json``, ``model.safetensors``
(or shards ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` once the weights exceed
``shard_bytes``, as ``transformers`` does) and a ``README.md`` card; fine-tunes' cards carry ``base_model`` and
``base_model_relation: finetune``. The weights load with ``LlamaForCausalLM.from_pretrained`` (no missing keys).

**The generator** (every number is drawn in fp32, then stored in bf16):

* base: every matrix (embeddings, attention and MLP projections, ``lm_head``) is ``N(0, 0.02^2)`` (the usual
  initializer range); every RMSNorm weight is ``1 + N(0, 0.02^2)``;
* fine-tune ``k``: ``ft = bf16(base + delta)`` with ``base`` the stored bf16 base, so the fine-tune differs from the
  base by the delta only. ``delta = DELTA_STD * s_row * z``, ``z ~ N(0, 1)``, with ``s_row = 1`` for most rows
  and ``s_row ~ U[10, 30]`` for *outlier rows*: each row of a matrix is one with probability
  :data:`OUTLIER_ROW_FRACTION` (at least one per matrix; a "row" is dim 0: an output channel, or a token of an
  embedding). ``DELTA_STD = 0.001`` puts ~99.6% of the entries below 0.005, as SFT deltas are (Yu et al. 2024,
  arXiv:2311.03099: "typically within 0.005"); the outlier rows carry the large entries. RMSNorm weights (one
  row) get no outlier row; near 1.0 a bf16 step is 0.004-0.008, so most of their deltas round to 0, as in real
  bf16 fine-tunes. Deltas of different fine-tunes are independent.

**Determinism.** Every piece of every tensor has its own ``torch.Generator``, seeded from a BLAKE2b hash of
(seed, stream, tensor name, shape, first row) -- never Python's ``hash`` -- so a given (seed, shape, fine-tune index,
tensor name) gives the same bytes whatever the shard size, the number of fine-tunes or the worker threads. The bytes
are those of the torch build that drew them: torch does not promise its normal sampler bit-identical across versions
or CPU instruction sets.

**Streaming.** Tensors are generated in pieces of about :data:`CHUNK_ELEMENTS` entries by a thread pool and written
as they come: the safetensors file is written by hand (8-byte little-endian header length, the JSON header sorted as
the safetensors library sorts it -- by dtype, then name -- padded with spaces to a multiple of 8, then the data tensor
by tensor), so memory stays at a few pieces whatever the model size. Each model is written under a temporary name,
then renamed into place once its ``.complete`` marker (the parameters that define it) is written: a folder under its
final name is complete, a folder whose marker matches is skipped, and anything else -- a partial folder from a killed
run, other parameters -- is rewritten. The free disk space is checked before anything is written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import yaml

__all__ = ["BASE_STD", "CHUNK_ELEMENTS", "DELTA_STD", "OUTLIER_ROW_FRACTION", "OUTLIER_SCALE", "SHAPES",
           "LlamaShape", "family_bytes", "write_synthetic_family"]

BASE_STD = 0.02  #: std of base matrices; RMSNorm weights are 1 + N(0, BASE_STD^2)
DELTA_STD = 0.001  #: std of an ordinary fine-tune delta entry
OUTLIER_ROW_FRACTION = 0.005  #: probability that a matrix row is an outlier row (at least one per matrix)
OUTLIER_SCALE = (10.0, 30.0)  #: an outlier row's delta std is DELTA_STD times a uniform draw from this range
CHUNK_ELEMENTS = 1 << 20  #: entries per generated piece (whole rows; fixed, so the bytes never depend on it)

# Bump when the generator or the folder layout changes: every marker changes, every folder is rewritten.
_FORMAT = 1
_MARKER = ".complete"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_DTYPE = torch.bfloat16


# -- shapes ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a ``LlamaForCausalLM`` (no attention or MLP biases).

    Attributes:
        hidden_size: model width.
        num_layers: decoder blocks.
        intermediate_size: MLP width (gate, up and down projections).
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        vocab_size: rows of the embedding (and of ``lm_head``).
        tie_embeddings: ``lm_head`` shares the embedding (no ``lm_head.weight`` in the checkpoint).
        head_dim: width of one head; ``None`` means ``hidden_size // num_heads``.

    Raises:
        ValueError: a dimension is not a positive integer, ``num_heads`` does not divide ``hidden_size`` (without an
            explicit ``head_dim``), or ``num_kv_heads`` does not divide ``num_heads``.
    """

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"LlamaShape.{name}={value!r} must be a positive integer.")
        if self.head_dim is not None and (type(self.head_dim) is not int or self.head_dim < 1):
            raise ValueError(f"LlamaShape.head_dim={self.head_dim!r} must be a positive integer or None.")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; pass "
                             "head_dim explicitly or change one of them.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                             "(grouped-query attention).")

    @property
    def dim_per_head(self) -> int:
        """The width of one attention head."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every stored tensor, in the order of ``LlamaForCausalLM.state_dict()``."""
        h, q, kv = self.hidden_size, self.num_heads * self.dim_per_head, self.num_kv_heads * self.dim_per_head
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                    (p + "mlp.gate_proj.weight", (self.intermediate_size, h)),
                    (p + "mlp.up_proj.weight", (self.intermediate_size, h)),
                    (p + "mlp.down_proj.weight", (h, self.intermediate_size)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, h)))
        return out

    @property
    def num_parameters(self) -> int:
        """The exact parameter count (tied embeddings counted once, as ``sum(p.numel() for p in parameters())``)."""
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        """The ``config.json`` of this shape: what ``transformers.AutoConfig`` reads as a ``LlamaConfig`` (bf16)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim_per_head, "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "initializer_range": BASE_STD,
            "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "dtype": "bfloat16",
        }


#: The named sizes. ``tiny`` is for unit tests; ``0.5b`` / ``1.5b`` have the widths of Qwen2.5-0.5B / 1.5B (as a
#: Llama: no attention biases, tied embeddings); ``7b`` is Llama-2-7B (6.74e9 parameters, untied ``lm_head``).
SHAPES: Mapping[str, LlamaShape] = MappingProxyType({
    "tiny": LlamaShape(hidden_size=64, num_layers=2, intermediate_size=176, num_heads=4, num_kv_heads=2,
                       vocab_size=1000, tie_embeddings=False),
    "0.5b": LlamaShape(hidden_size=896, num_layers=24, intermediate_size=4864, num_heads=14, num_kv_heads=2,
                       vocab_size=151936, tie_embeddings=True),
    "1.5b": LlamaShape(hidden_size=1536, num_layers=28, intermediate_size=8960, num_heads=12, num_kv_heads=2,
                       vocab_size=151936, tie_embeddings=True),
    "7b": LlamaShape(hidden_size=4096, num_layers=32, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                     vocab_size=32000, tie_embeddings=False),
})


def _shape_of(size: str | LlamaShape) -> tuple[str, LlamaShape]:
    """(label, shape) of a named size or a shape; a custom shape's label is a digest of its dimensions."""
    if isinstance(size, LlamaShape):
        named = [k for k, v in SHAPES.items() if v == size]
        return (named[0] if named else "custom-" + _digest(repr(size))[:8]), size
    if size not in SHAPES:
        raise KeyError(f"unknown size {size!r}; available: {sorted(SHAPES)}, or pass a LlamaShape.")
    return size, SHAPES[size]


# -- the generator -----------------------------------------------------------------------------------------------------
def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from (seed, parts) by a stable hash (63 bits: ``manual_seed`` takes a signed int64)."""
    key = hashlib.blake2b("\0".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:  # a 1-D tensor is one row
        return self.shape[0] if len(self.shape) == 2 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE.itemsize

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1

    def pieces(self) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) of the generated pieces: whole rows, about CHUNK_ELEMENTS entries each."""
        step = max(1, CHUNK_ELEMENTS // self.cols)
        return [(r0, min(r0 + step, self.rows)) for r0 in range(0, self.rows, step)]


def _row_scales(seed: int, ft: int, t: _Tensor) -> torch.Tensor:
    """The delta std of every row of tensor ``t`` in fine-tune ``ft``: DELTA_STD, times U[10, 30] on outlier rows."""
    g = _generator(seed, f"ft{ft}/rows", t.name, t.shape)
    pick, mult = torch.rand(t.rows, generator=g), torch.rand(t.rows, generator=g)  # [rows] each
    outlier = pick < OUTLIER_ROW_FRACTION
    if t.is_norm:
        outlier[:] = False
    elif not outlier.any():
        outlier[pick.argmin()] = True
    lo, hi = OUTLIER_SCALE
    return torch.where(outlier, lo + (hi - lo) * mult, torch.ones_like(mult)).mul_(DELTA_STD)


def _piece(seed: int, t: _Tensor, r0: int, r1: int, fts: list[int], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rows [r0, r1) of tensor ``t`` in bf16: the base, then fine-tune ``k`` for each ``k`` in ``fts``."""
    base = torch.empty(r1 - r0, t.cols)  # [rows, cols] fp32
    base.normal_(1.0 if t.is_norm else 0.0, BASE_STD, generator=_generator(seed, "base", t.name, t.shape, r0))
    stored = base.to(_DTYPE)
    out = [stored]
    if fts:
        base.copy_(stored)  # the delta goes on the stored (bf16) base: ft - base is the delta rounded to bf16
        delta = torch.empty_like(base)
        for k, scale in zip(fts, scales):
            delta.normal_(generator=_generator(seed, f"ft{k}", t.name, t.shape, r0))
            delta.mul_(scale[r0:r1, None]).add_(base)  # scale[r0:r1, None]: [rows, 1], one std per row
            out.append(delta.to(_DTYPE))
    return out


# -- layout ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shard:
    file: str
    tensors: tuple[_Tensor, ...]  # in file order: sorted by name (all share one dtype), as safetensors writes them
    header: bytes

    @property
    def size(self) -> int:
        return 8 + len(self.header) + sum(t.nbytes for t in self.tensors)


def _header(tensors: tuple[_Tensor, ...]) -> bytes:
    """The safetensors header of ``tensors`` (in file order), padded with spaces to a multiple of 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _shards(shape: LlamaShape, shard_bytes: int) -> list[_Shard]:
    """Split the tensors, in state-dict order, into shards of at most ``shard_bytes`` (a bigger tensor alone), as
    ``transformers`` does; one shard is ``model.safetensors``, more are ``model-0000k-of-0000n.safetensors``."""
    groups: list[list[_Tensor]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        t = _Tensor(name, dims)
        if groups[-1] and size + t.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    out = []
    for i, group in enumerate(groups):
        ordered = tuple(sorted(group, key=lambda t: t.name))
        out.append(_Shard(_WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", ordered,
                          _header(ordered)))
    return out


def _card(front: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body


def _small_files(shape: LlamaShape, shards: list[_Shard], model: str, model_id: str, base_id: str,
                 params: dict) -> dict[str, str]:
    """config.json, the index (sharded only) and README.md of one model, as text."""
    files = {"config.json": json.dumps(shape.config(), indent=2) + "\n"}
    if len(shards) > 1:
        weight_map = {t.name: s.file for s in shards for t in s.tensors}
        total = sum(t.nbytes for s in shards for t in s.tensors)
        files[_INDEX] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                                   sort_keys=True) + "\n"
    what = (f"Synthetic Llama checkpoint written by `deltakit.testing.write_synthetic_family` "
            f"({shape.num_parameters:,} parameters, bf16, seed {params['seed']}). Random weights: not a language "
            "model. See the `deltakit.testing` module docstring for the generator.\n")
    front: dict = {"model_id": model_id, "library_name": "transformers", "tags": ["deltakit-synthetic"]}
    if model != "base":
        front.update(base_model=base_id, base_model_relation="finetune")
        what += (f"\nFine-tune `{model}` of `{base_id}`: base + delta, delta std {DELTA_STD} with outlier rows "
                 f"(fraction {OUTLIER_ROW_FRACTION}, std x U{list(OUTLIER_SCALE)}).\n")
    files["README.md"] = _card(front, f"# {model_id}\n\n{what}")
    return files


def _params(label: str, shape: LlamaShape, seed: int, shard_bytes: int, model: str) -> dict:
    """Everything that defines a model folder: what its marker holds."""
    return {"format": _FORMAT, "size": label, "shape": asdict(shape), "seed": seed, "shard_bytes": shard_bytes,
            "model": model, "torch": torch.__version__, "base_std": BASE_STD, "delta_std": DELTA_STD,
            "outlier_row_fraction": OUTLIER_ROW_FRACTION, "outlier_scale": list(OUTLIER_SCALE),
            "chunk_elements": CHUNK_ELEMENTS}


def _is_complete(folder: Path, params: dict, shards: list[_Shard]) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("params") != params:
        return False
    return all((folder / s.file).is_file() and (folder / s.file).stat().st_size == s.size for s in shards)


def _tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _existing_ancestor(folder: Path) -> Path:
    path = folder.absolute()
    while not path.exists():
        path = path.parent
    return path


def family_bytes(size: str | LlamaShape = "0.5b", *, finetunes: int = 1, shard_bytes: int = 2**31) -> int:
    """Bytes on disk of a family written by :func:`write_synthetic_family` (weights and headers; small files aside).

    Args:
        size / finetunes / shard_bytes: as for :func:`write_synthetic_family`.

    Returns:
        The total size of the safetensors files of the base and the fine-tunes.
    """
    _, shape = _shape_of(size)
    return (1 + finetunes) * sum(s.size for s in _shards(shape, shard_bytes))


# -- writing -----------------------------------------------------------------------------------------------------------
def write_synthetic_family(
    folder: str | os.PathLike[str],
    size: str | LlamaShape = "0.5b",
    *,
    finetunes: int = 1,
    seed: int = 0,
    shard_bytes: int = 2**31,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Write (or reuse) a synthetic Llama base and ``finetunes`` fine-tunes as Hub-style folders.

    Layout: ``folder/base``, ``folder/ft0``, ``folder/ft1``, ... Each is complete once it exists under that name; a
    model whose ``.complete`` marker matches the parameters is skipped, any other is (re)written. The values follow
    the generator in the module docstring; they depend on (seed, shape, model, tensor name) only.

    Args:
        folder: where the family lives (created if needed).
        size: a name in :data:`SHAPES` (``"tiny"``, ``"0.5b"``, ``"1.5b"``, ``"7b"``) or a :class:`LlamaShape`.
        finetunes: how many fine-tunes (``ft0`` ... ``ft{finetunes-1}``); 0 writes the base only.
        seed: the seed every value derives from.
        shard_bytes: the largest shard, in bytes of tensor data (default 2 GiB); a bigger tensor gets a shard of
            its own. Weights that fit in one shard are one ``model.safetensors`` without an index.
        workers: threads generating values (default: the CPU count, at most 8); results do not depend on it. While
            they run, torch's intra-op threads are set to 1 (restored after): the pool already uses the cores.
        progress: show a progress bar over the bytes written.

    Returns:
        ``{"base": folder/"base", "ft0": folder/"ft0", ...}``.

    Raises:
        KeyError: unknown size name (the message lists the available ones).
        ValueError: ``finetunes`` negative, ``shard_bytes`` or ``workers`` below 1.
        OSError: too little free disk space for what must be written (checked before writing; errno ENOSPC; the
            message names the folder, the bytes needed and the bytes free), or a failed write (nothing is left under
            a final name).
    """
    label, shape = _shape_of(size)
    if type(finetunes) is not int or finetunes < 0:
        raise ValueError(f"finetunes={finetunes!r} must be an integer >= 0.")
    if type(shard_bytes) is not int or shard_bytes < 1:
        raise ValueError(f"shard_bytes={shard_bytes!r} must be a positive integer (bytes per shard).")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer.")
    root = Path(folder)
    shards = _shards(shape, shard_bytes)
    models = ["base"] + [f"ft{k}" for k in range(finetunes)]
    paths = {m: root / m for m in models}
    params = {m: _params(label, shape, seed, shard_bytes, m) for m in models}
    todo = [m for m in models if not _is_complete(paths[m], params[m], shards)]
    if not todo:
        return paths

    per_model = sum(s.size for s in shards)
    needed = len(todo) * per_model + (1 << 20)  # + small files and file-system slack
    staging = {m: root / f".{m}.partial" for m in todo}
    reclaimable = sum(_tree_bytes(paths[m]) + _tree_bytes(staging[m]) for m in todo)
    free = shutil.disk_usage(_existing_ancestor(root)).free
    if free + reclaimable < needed:
        raise OSError(errno.ENOSPC,
                      f"not enough free disk space in {root}: writing {todo} of the synthetic {label} family needs "
                      f"{needed:,} bytes ({needed / 1e9:.2f} GB), {free + reclaimable:,} bytes are available "
                      f"({free:,} free + {reclaimable:,} in folders to be replaced). Free some space or pass another "
                      "folder.")

    for m in todo:
        shutil.rmtree(staging[m], ignore_errors=True)
        staging[m].mkdir(parents=True)
    base_id = f"deltakit-synthetic/llama-{label}-seed{seed}"
    try:
        _write_weights(staging, shards, seed, todo, workers, progress)
        for m in todo:
            for name, text in _small_files(shape, shards, m, base_id if m == "base" else f"{base_id}-{m}", base_id,
                                           params[m]).items():
                (staging[m] / name).write_text(text)
            (staging[m] / _MARKER).write_text(json.dumps({"params": params[m]}, indent=1) + "\n")
            shutil.rmtree(paths[m], ignore_errors=True)
            os.replace(staging[m], paths[m])
    finally:
        for m in todo:
            shutil.rmtree(staging[m], ignore_errors=True)
    return paths


def _write_weights(staging: dict[str, Path], shards: list[_Shard], seed: int, todo: list[str], workers: int,
                   progress: bool) -> None:
    """Write every shard of every model in ``todo``; the base's values are drawn even when it is not written."""
    from tqdm.auto import tqdm

    fts = [int(m[2:]) for m in todo if m != "base"]
    write_base = "base" in todo
    total = len(todo) * sum(s.size for s in shards)
    window = 2 * workers + 2  # pieces in flight: bounds memory to a few pieces per model
    bar = tqdm(total=total, desc="synthetic weights", unit="B", unit_scale=True, disable=not progress)
    threads = torch.get_num_threads()
    # The pool parallelises across pieces; intra-op threads on top would only oversubscribe the cores (torch's
    # normal sampler is single-threaded anyway). Restored on exit.
    torch.set_num_threads(1)
    try:
        with bar, ThreadPoolExecutor(workers, thread_name_prefix="deltakit-synthetic") as pool:
            for shard in shards:
                with ExitStack() as files:
                    outs = [files.enter_context(open(staging[m] / shard.file, "wb")) for m in todo]
                    for f in outs:
                        f.write(len(shard.header).to_bytes(8, "little"))
                        f.write(shard.header)
                    bar.update(len(outs) * (8 + len(shard.header)))
                    pending: deque[Future] = deque()
                    for job in _jobs(seed, shard, fts):
                        pending.append(pool.submit(_piece, seed, *job))
                        if len(pending) >= window:
                            _emit(pending.popleft().result(), outs, write_base, bar)
                    while pending:
                        _emit(pending.popleft().result(), outs, write_base, bar)
                    for f, m in zip(outs, todo):
                        if f.tell() != shard.size:  # a bug, not a user error: never rename such a folder in place
                            raise RuntimeError(f"{staging[m] / shard.file}: wrote {f.tell()} bytes, expected "
                                               f"{shard.size}")
    finally:
        torch.set_num_threads(threads)


def _jobs(seed: int, shard: _Shard, fts: list[int]) -> Iterator[tuple]:
    for t in shard.tensors:
        scales = [_row_scales(seed, k, t) for k in fts]
        for r0, r1 in t.pieces():
            yield t, r0, r1, fts, scales


def _emit(pieces: list[torch.Tensor], outs: list, write_base: bool, bar) -> None:
    """Write one piece's bytes to every open file: the base's (if written), then each fine-tune's."""
    chosen = pieces if write_base else pieces[1:]
    for f, piece in zip(outs, chosen):
        f.write(memoryview(piece.view(torch.uint8).numpy()).cast("B"))
        bar.update(piece.numel() * piece.element_size())
