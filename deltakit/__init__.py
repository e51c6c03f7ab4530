"""deltakit: what did fine-tuning change in a model, and how much of that change can be thrown away?

The flow: a model reference resolves to a local snapshot (:mod:`deltakit.sources`), tensors are read
lazily one at a time (:mod:`deltakit.tensors`), base and fine-tune are paired (:mod:`deltakit.pairing`), and the
delta stream feeds statistics (:mod:`deltakit.stats`) and pruning methods (:mod:`deltakit.methods`). Sweeps
(:mod:`deltakit.sweep`) prune a resident fine-tune over rates and seeds; merges (:mod:`deltakit.merge`) combine several
fine-tunes of one base; :mod:`deltakit.export` writes what was pruned or merged.
"""

from __future__ import annotations

import os
import sys
import warnings

# Idle OpenMP threads spin by default; on a small shared machine that slows torch several-fold whenever anything
# else runs (measured: 7 s vs 2 s per training step on 2 cores). OpenMP reads the policy once, when torch is
# first imported: setting it here works only if deltakit comes first, so say once what to do otherwise.
if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    warnings.warn(
        "torch was imported before deltakit, so its OpenMP threads spin while idle, which makes deltakit several "
        "times slower whenever anything else runs on the machine (benchmarks/import_order.py measures it). Set "
        "OMP_WAIT_POLICY=PASSIVE in the environment before Python starts (e.g. `export OMP_WAIT_POLICY=PASSIVE`, "
        "or %env OMP_WAIT_POLICY=PASSIVE in the first cell of a notebook), or import deltakit before torch.",
        stacklevel=2,
    )
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from deltakit.pairing import PRESETS, Pairing, PairingError, pair_models
from deltakit.sources import ModelRef, Snapshot, SourceError, resolve
from deltakit.stats import DeltaStats, delta_stats
from deltakit.tensors import CorruptCheckpointError, TensorReader

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CorruptCheckpointError",
    "DeltaStats",
    "ModelRef",
    "Pairing",
    "PairingError",
    "Snapshot",
    "SourceError",
    "TensorReader",
    "delta_stats",
    "pair_models",
    "resolve",
]
