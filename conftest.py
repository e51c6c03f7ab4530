"""Repository-wide pytest set-up: what the notebooks (collected by nbval from notebooks/) run on.

The notebooks read DELTAKIT_NOTEBOOK_FAMILY (the decoder notebook DELTAKIT_NOTEBOOK_LLM_FAMILY) in their parameters
cell; under the test suite they use the `tiny` and `tiny-llm` families (built in seconds) so each runs in well under
the 10-minute budget. nbval's kernels inherit this environment. Set the variables yourself to run them on
minilm-tweets and smollm2.
"""

from __future__ import annotations

import os

# Before anything imports torch: idle OpenMP threads then sleep instead of spinning (see deltakit/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DELTAKIT_NOTEBOOK_FAMILY", "tiny")
os.environ.setdefault("DELTAKIT_NOTEBOOK_LLM_FAMILY", "tiny-llm")  # notebooks/05_llm_deltas.ipynb
