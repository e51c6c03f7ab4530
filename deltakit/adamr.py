"""AdamR: Adam with a regulariser that pulls the fine-tuned weights back toward the pre-trained ones (DAREx-L2).

DARE fails when the influences ``c = ΔW·x`` of the delta ``Δ = θ − θ_pre`` have a large mean or variance (Deng
et al., "DARE the Extreme", arXiv 2410.09344, ICLR 2025, §3 and the AdamR algorithm). AdamR keeps the delta
small while fine-tuning, so that DARE or DAREx-q can drop most of it afterwards. It is AdamS's "stable weight
decay" (AdamS; Xie et al., "Stable Weight Decay Regularization") with the decay aimed at ``θ − θ_pre`` instead
of ``θ``. Per step, for every parameter with a gradient::

    m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g² ;  v̂ = v / (1 − β2^t)
    s = sqrt(mean of v̂ over every element of every parameter with a gradient)   (s = 1 if that is 0)
    L2:  θ ← θ − λ·lr/s · (θ − θ_pre)        L1:  θ ← θ − λ·lr/s · sign(θ − θ_pre)
    θ ← θ − lr/(1 − β1^t) · m / (sqrt(v̂) + ε)

Dividing by the global ``s`` keeps the pull in step with Adam's own normalised update size. With ``λ = 0`` this is
exactly Adam.

Differences from the reference ``AdamR.py``: each pre-trained tensor is paired with its parameter once, at
construction, and copied once onto the parameter's device and dtype (the reference zips one list against every
group, deep-copies it on every step and prints on every step). Parameters without a pre-trained tensor (a new
classifier head) get no pull; the reference pulls whatever it is given, so excluding the head is the caller's
job, which :func:`adamr_param_groups` does by default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltakit.names import is_head

__all__ = ["AdamR", "adamr_param_groups"]


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"lr={lr!r} must be a finite number >= 0.")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"eps={eps!r} must be a finite number >= 0.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999).")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(
            f"weight_decay={weight_decay!r} must be a finite number >= 0; it is the strength λ of the pull toward "
            "the pre-trained weights (0 = plain Adam)."
        )


class AdamR(torch.optim.Optimizer):
    """Adam with a pull of the weights toward their pre-trained values (DAREx's AdamR-L2 / AdamR-L1).

    Each pre-trained tensor is stored in the optimizer state of its parameter under ``"pre"``, so it follows
    ``state_dict()`` / ``load_state_dict()``. Parameter groups may override ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and ``l1``; ``s`` is always global over all groups. Parameters added later with
    ``add_param_group`` have no pre-trained tensor (plain Adam).

    Args:
        params: parameters or parameter-group dicts, as for ``torch.optim.Adam``.
        pre_params: one pre-trained tensor (or ``None``) per parameter, in the order of ``params`` (groups
            flattened in order). ``None`` (the default, or an entry) means no pull for that parameter. Each
            tensor is copied once to its parameter's device and dtype.
        lr: learning rate, >= 0.
        betas: Adam's moment decay rates, each in [0, 1).
        eps: Adam's denominator guard, >= 0.
        weight_decay: strength λ >= 0 of the pull toward the pre-trained weights; 0 gives Adam exactly.
        l1: pull by ``sign(θ − θ_pre)`` (AdamR-L1) instead of ``θ − θ_pre`` (AdamR-L2).

    Raises:
        ValueError: for a negative ``lr``/``eps``/``weight_decay``, bad ``betas``, a ``pre_params`` list of the
            wrong length, or a pre-trained tensor whose shape differs from its parameter's.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        pre_params: Sequence[Tensor | None] | None = None,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        l1: bool = False,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, l1=l1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        if pre_params is None:
            return
        flat = [p for group in self.param_groups for p in group["params"]]
        pre_list = list(pre_params)
        if len(pre_list) != len(flat):
            raise ValueError(
                f"pre_params has {len(pre_list)} entries but there are {len(flat)} parameters; pass one "
                "pre-trained tensor (or None) per parameter, in order (adamr_param_groups builds both lists)."
            )
        for index, (param, pre) in enumerate(zip(flat, pre_list)):
            if pre is None:
                continue
            if not isinstance(pre, Tensor):
                raise ValueError(f"pre_params[{index}] is a {type(pre).__name__}; expected a Tensor or None.")
            if pre.shape != param.shape:
                raise ValueError(
                    f"pre_params[{index}] has shape {tuple(pre.shape)} but parameter {index} has shape "
                    f"{tuple(param.shape)}; pair each parameter with its own pre-trained tensor, or None."
                )
            # One copy, on the parameter's device and in its dtype: no per-step transfers or deep copies.
            self.state[param]["pre"] = torch.empty_like(param, memory_format=torch.preserve_format).copy_(pre)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: for sparse gradients.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # s is only needed when some parameter with a gradient is pulled; plain Adam skips the reductions.
        need_s = any(
            group["weight_decay"] != 0 and param.grad is not None and "pre" in self.state.get(param, {})
            for group in self.param_groups
            for param in group["params"]
        )
        # Pass 1: update the moments of every parameter with a gradient, and gather what s needs.
        active: list[tuple[Tensor, dict[str, Any], dict[str, Any]]] = []
        v_hat_sums: dict[torch.device, Tensor] = {}  # one running sum per device: a single sync per device
        n_elements = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError("AdamR does not support sparse gradients; use dense gradients.")
                state = self.state[param]
                if "step" not in state:  # "pre" may already be there
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                active.append((param, group, state))
                if need_s:
                    v_hat_sum = state["exp_avg_sq"].sum(dtype=torch.float64) / (1 - beta2 ** state["step"])
                    device = param.device
                    v_hat_sums[device] = v_hat_sums[device] + v_hat_sum if device in v_hat_sums else v_hat_sum
                    n_elements += param.numel()

        s = 1.0
        if need_s:
            s = math.sqrt(sum(float(t) for t in v_hat_sums.values()) / n_elements)
            if s == 0.0:  # all gradients so far were zero: no scale to match, pull at the bare λ·lr
                s = 1.0

        # Pass 2: the pull toward the pre-trained weights, then the Adam step.
        for param, group, state in active:
            lr, eps = group["lr"], group["eps"]
            beta1, beta2 = group["betas"]
            if group["weight_decay"] != 0 and "pre" in state:
                strength = group["weight_decay"] * lr / s
                if group["l1"]:
                    param.sub_(torch.sign(param - state["pre"]), alpha=strength)
                else:
                    param.lerp_(state["pre"], strength)  # θ − strength·(θ − θ_pre), in place
            step = state["step"]
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            # Same arithmetic as torch.optim.Adam's single-tensor path, so λ = 0 reproduces it bit for bit.
            denom = (state["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(eps)
            param.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)
        return loss


def adamr_param_groups(
    model: nn.Module,
    base_state: dict[str, Tensor],
    exclude: str | Callable[[str], bool] | None = is_head,
) -> tuple[list[nn.Parameter], list[Tensor | None]]:
    """Pair a model's trainable parameters with their pre-trained tensors, by name, for :class:`AdamR`.

    ``AdamR(*adamr_param_groups(model, base_state), weight_decay=...)`` pulls every parameter toward its
    pre-trained value except those ``exclude`` selects (by default the output head,
    :func:`deltakit.names.is_head`, which has no meaningful pre-trained value) and those missing from ``base_state`` (e.g. a freshly initialised head).

    Args:
        model: the model being fine-tuned; only parameters with ``requires_grad`` are returned.
        base_state: pre-trained tensors keyed by the same names as ``model.named_parameters()`` (e.g. the
            base model's ``state_dict()``, or the fine-tune's initial state). Names must match exactly: strip
            or add a prefix such as ``bert.`` beforehand.
        exclude: a predicate on parameter names, or a regex they must fully match (``re.fullmatch``); the
            parameters it selects get no pull. ``None`` excludes nothing.

    Returns:
        ``(params, pre_params)``: the trainable parameters in ``named_parameters()`` order and, per parameter,
        its pre-trained tensor or ``None``.

    Raises:
        ValueError: if a paired pre-trained tensor has a different shape from its parameter, or ``exclude`` is
            not a valid regex.
    """
    if isinstance(exclude, str):
        try:
            excluded = re.compile(exclude).fullmatch
        except re.error as err:
            raise ValueError(f"exclude={exclude!r} is not a valid regular expression: {err}.") from None
    else:
        excluded = exclude or (lambda name: False)
    params: list[nn.Parameter] = []
    pre_params: list[Tensor | None] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        params.append(param)
        pre = base_state.get(name)
        if pre is None or excluded(name):
            pre_params.append(None)
            continue
        if pre.shape != param.shape:
            raise ValueError(
                f"base tensor {name!r} has shape {tuple(pre.shape)} but the parameter has shape "
                f"{tuple(param.shape)} (a resized vocabulary?); exclude it with `exclude` or fix the base state."
            )
        pre_params.append(pre)
    return params, pre_params
