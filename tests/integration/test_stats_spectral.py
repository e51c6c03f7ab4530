"""Spectral statistics in delta_stats on the tiny family: filled for the 2-D deltas, and only for those."""

from __future__ import annotations

from pathlib import Path

from deltakit.spectral import SPECTRAL_COLUMNS
from deltakit.stats import delta_stats
from deltakit.tensors import TensorReader


def test_spectral_columns_are_filled_for_2d_tensors_only(tiny: Path) -> None:
    st = delta_stats("family:tiny/base", ["family:tiny/sentiment3"], progress=False, spectral=True)
    reader = TensorReader(tiny / "sentiment3")
    is_2d = st.tensors["tensor"].map(lambda name: len(reader.info(name).shape) == 2)
    spectral = st.tensors[list(SPECTRAL_COLUMNS)]
    assert is_2d.any() and (~is_2d).any()
    assert spectral[is_2d].notna().all().all()  # the tiny fine-tune's deltas are finite
    assert spectral[~is_2d].isna().all().all()
    assert (st.tensors.loc[is_2d, "spectral_exact"]).all()  # min(m, n) <= 64 <= exact_max
    assert (st.tensors.loc[is_2d, "stable_rank"] >= 1).all()
    assert (st.tensors.loc[is_2d, "effective_rank"] >= st.tensors.loc[is_2d, "stable_rank"] - 1e-9).all()
