"""Repository-wide pytest set-up: what the notebooks (collected by nbval from notebooks/) run on.

The notebooks read DELTAKIT_NOTEBOOK_FAMILY in their parameters cell; under the test suite they use the `tiny`
family (built in seconds) so each runs in well under the 10-minute budget. nbval's kernels inherit this
environment. Set the variable yourself to run them on minilm-tweets.
"""

from __future__ import annotations

import os

os.environ.setdefault("DELTAKIT_NOTEBOOK_FAMILY", "tiny")
