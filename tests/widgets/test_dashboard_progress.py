"""StatsDashboard's progress bar follows delta_stats: bytes read, one step per tensor, full at the end."""

from __future__ import annotations

from deltakit.widgets import StatsDashboard


def test_dashboard_progress_steps_once_per_tensor_read_up_to_the_total_bytes(bert_family):
    d = StatsDashboard(str(bert_family["base"]), [str(bert_family["ft1"]), str(bert_family["ft2"])])
    values: list[int] = []
    d.progress.observe(lambda change: values.append(change["new"]), names="value")
    d.compute(blocking=True)
    tensors = d.stats.tensors
    assert d.status.value.startswith("done"), d.status.value
    # one read per base tensor, one per fine-tune tensor
    assert len(values) == tensors["base_tensor"].nunique() + len(tensors)
    assert values == sorted(set(values)) and values[-1] == d.progress.max
    # bytes, not steps: every fine-tune tensor is float32 here, 4 bytes an entry
    assert d.progress.max > 4 * tensors["numel"].sum()
