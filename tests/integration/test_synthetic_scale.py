"""Delta statistics at real scale (opt-in, ``-m slow``): a synthetic 0.5B pair, streamed with bounded memory."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The child measures its own peak RSS (ru_maxrss, KiB on Linux) after imports and after the statistics.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import deltakit
    from deltakit.stats import delta_stats

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = peak_mb()
    st = delta_stats(sys.argv[1], [sys.argv[2]], progress=False)
    t = st.tensors
    print(json.dumps({"before_mb": before, "after_mb": peak_mb(), "overall": st.overall.iloc[0].to_dict(),
                      "tensors": t[["tensor", "max_abs", "p99_abs", "frac_below_0.005"]].to_dict("records")}))
""")


@pytest.mark.slow
def test_stats_on_a_half_billion_pair_stay_bounded_and_see_the_outlier_rows(tmp_path):
    from deltakit.testing import DELTA_STD, OUTLIER_SCALE, SHAPES, write_synthetic_family

    try:
        paths = write_synthetic_family(tmp_path / "llama-0.5b", "0.5b")
        run = subprocess.run([sys.executable, "-c", _CHILD, str(paths["base"]), str(paths["ft0"])], cwd=ROOT,
                             capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp_path / "llama-0.5b", ignore_errors=True)  # 2 GB: do not leave it in the temp folder

    shape = SHAPES["0.5b"]
    largest = 2 * max(math.prod(dims) for _, dims in shape.tensors())  # bytes of the largest bf16 tensor
    growth_mb = out["after_mb"] - out["before_mb"]
    # Streaming: a few tensors resident at a time (base + fine-tune of the largest, plus working chunks), never the
    # 2 GB of the pair.
    assert growth_mb < 4 * largest / 2**20, (growth_mb, largest)
    assert out["overall"]["numel"] == shape.num_parameters
    assert 0.99 < out["overall"]["frac_below_0.005"] < 1.0 and out["overall"]["p99_abs"] < 0.005
    matrices = [r for r in out["tensors"] if not r["tensor"].endswith("norm.weight")]
    assert len(matrices) == 1 + 7 * shape.num_layers
    for r in matrices:  # every matrix has outlier rows: entries an ordinary row (std DELTA_STD) never reaches
        assert r["max_abs"] > 2 * OUTLIER_SCALE[0] * DELTA_STD and r["frac_below_0.005"] < 1.0, r
