"""What a registry entry's prepare step receives (:class:`PrepareContext`) and returns (:class:`Prepared`).

A prepare step computes, before a sweep point is applied, inputs that come from the resident model and data: a
DAREx-q search's q, WANDA's activation norms. ``deltakit.sweep.SweepContext`` is the context a sweep passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["PrepareContext", "Prepared"]


@dataclass(frozen=True)
class Prepared:
    """What a prepare step chose for one point.

    Attributes:
        params_for: per-tensor parameters for the apply (tensor name -> params), merged over the entry's own; None
            when every tensor gets the same.
        params: parameters for every tensor (e.g. one searched ``q``).
        q: the DAREx-q rescale chosen (recorded with the point), NaN when the step chooses none.
        record: what else to record with the point (the search's q, eta, number of evaluations, ...).
    """

    params_for: Callable[[str], dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    q: float = math.nan
    record: dict[str, Any] = field(default_factory=dict)


class PrepareContext(Protocol):
    """What a prepare step may use: the sweep's resident model, its data, and a memo (deltakit.sweep builds one).

    Attributes:
        model: the resident model (its prunable parameters are rewritten by :meth:`apply`).
        targets: the prunable tensors, each with ``name`` and ``param`` (the model's parameter).
    """

    model: Any
    targets: Sequence[Any]

    def weights(self, target: Any) -> tuple[Any, Any]:
        """The base and fine-tuned values of a target, on the model's device (read from the files when the sweep's
        memory tier streams them)."""

    def apply(self, method: str, *, rate: float, seed: int, backend: str = "auto",
              params_for: Callable[[str], dict[str, Any]] | None = None, **params: Any) -> None:
        """Rewrite every prunable tensor with base + method(delta)."""

    def restore(self) -> None:
        """Put the fine-tuned values back."""

    def search_evaluator(self) -> Callable[[Any], dict[str, float]]:
        """The labelled validation evaluator searches maximise (never the test split)."""

    def batches(self) -> list[dict[str, Any]]:
        """Tokenized unlabelled calibration batches."""

    def activations(self) -> Any:
        """Activation statistics of the fine-tuned model on the calibration batches (``deltakit.calibration``)."""

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key for the whole sweep (a search depends on the rate, not the seed)."""
