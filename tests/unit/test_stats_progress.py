"""delta_stats progress: one bar over the bytes of every tensor read, advanced once per tensor, reaching the total."""

from __future__ import annotations

import io
import itertools

import torch
from tqdm.auto import tqdm

import deltakit.stats
from deltakit.stats import delta_stats
from synthetic import bert_like, write_checkpoint


def test_progress_advances_once_per_tensor_read_by_its_bytes(tmp_path, monkeypatch):
    base = bert_like(0)
    fts = {
        "ft0": bert_like(10, prefix="bert.", head=True, scale=1e-3, base=base),
        # bf16: the fine-tune's reads count its own (half) bytes, not the base's
        "ft1": {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in bert_like(11, prefix="bert.", scale=1e-3, base=base).items()},
    }
    b = write_checkpoint(tmp_path / "base", base)
    folders = [write_checkpoint(tmp_path / name, tensors) for name, tensors in fts.items()]
    bars: list[tqdm] = []

    def recording_tqdm(*args, **kwargs) -> tqdm:
        bars.append(tqdm(*args, file=io.StringIO(), **kwargs))
        return bars[-1]

    monkeypatch.setattr(deltakit.stats, "tqdm", recording_tqdm)
    calls: list[tuple[int, int, str]] = []
    st = delta_stats(str(b), [str(f) for f in folders], on_progress=lambda *args: calls.append(args))

    # The expected reads, in order: each base tensor once, then that tensor of every fine-tune that pairs it.
    reads: list[tuple[str, int]] = []
    for base_name, rows in itertools.groupby(st.tensors.itertuples(), key=lambda r: r.base_tensor):
        reads.append((f"base: {base_name}", base[base_name].nbytes))
        reads += [(f"{r.model}: {r.tensor}", fts[r.model][r.tensor].nbytes) for r in rows]
    total = sum(size for _, size in reads)
    assert len(reads) > len(st.tensors) > 0
    assert calls == [(done, total, current) for (current, _), done in
                     zip(reads, itertools.accumulate(size for _, size in reads))]
    (bar,) = bars
    assert bar.n == bar.total == total and bar.unit == "B" and bar.unit_scale
    assert bar.postfix == reads[-1][0]
