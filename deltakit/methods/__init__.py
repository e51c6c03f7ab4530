"""Delta-parameter pruning methods: a registry (``registry.py``) and one family per module.

Importing this package registers every built-in method (importing a family module runs its decorators):
``dare``, ``drop_only``, ``darex_q`` (``dare.py``), ``magnitude``, ``wanda`` (``magnitude.py``) and ``structural``
(``structural.py``). Reach a method through the registry, ``get_method("dare").fn``, or from its module,
``from deltakit.methods.dare import dare``. The functions are deliberately not re-exported here: ``dare``,
``magnitude`` and ``structural`` would shadow their own modules as attributes of this package.
"""

from __future__ import annotations

from deltakit.methods import dare, magnitude, structural  # noqa: F401  (registers the built-in methods)
from deltakit.methods.registry import (
    MethodInfo,
    RandomPlan,
    available_methods,
    get_method,
    method_params,
    register,
)

__all__ = [
    "MethodInfo",
    "RandomPlan",
    "available_methods",
    "get_method",
    "method_params",
    "register",
]
