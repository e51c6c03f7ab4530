"""Delta-parameter pruning methods: a registry (``registry.py``) and one family per module.

Importing this package registers every built-in entry (importing a family module runs its decorators):
``dare``, ``drop_only``, ``darex_q`` (``dare.py``), ``magnitude``, ``wanda`` (``magnitude.py``), ``structural``
(``structural.py``), the DAREx-q searches ``darex_q_labelled``, ``darex_q_unlabelled``, ``darex_q_analytic``
(``darex_q_search.py``: they choose q, then apply as ``darex_q``), and the reference points ``finetuned`` and
``base`` (``references.py``); the merge methods ``ta``, ``ties``, ``dare_ta``, ``dare_ties``, ``breadcrumbs`` and
``della`` (``merging.py``: K deltas -> one, ``get_merge(name)``). Reach a method through the registry, ``get_method("dare").fn``, or from its module,
``from deltakit.methods.dare import dare``. The functions are deliberately not re-exported here: ``dare``,
``magnitude`` and ``structural`` would shadow their own modules as attributes of this package.
"""

from __future__ import annotations

from deltakit.methods import dare, magnitude, references, structural  # noqa: F401  (registers the built-ins)
from deltakit.methods import darex_q_search  # noqa: F401  (after dare: its entries apply as darex_q)
from deltakit.methods import merging  # noqa: F401  (registers the merge methods: ta, ties, dare_ta, ...)
from deltakit.methods.merging import MergeInfo, get_merge, merge_methods, register_merge
from deltakit.methods.prepare import PrepareContext, Prepared
from deltakit.methods.registry import (
    MethodInfo,
    RandomPlan,
    available_methods,
    get_method,
    method_params,
    reference_methods,
    register,
    register_prepared,
    sweep_methods,
)

__all__ = [
    "MergeInfo",
    "MethodInfo",
    "PrepareContext",
    "Prepared",
    "RandomPlan",
    "available_methods",
    "get_merge",
    "get_method",
    "merge_methods",
    "method_params",
    "reference_methods",
    "register",
    "register_merge",
    "register_prepared",
    "sweep_methods",
]
