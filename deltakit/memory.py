"""Memory budgets of a sweep: parse a budget, estimate each tier's footprint from the headers, pick a tier.

A sweep holds the fine-tuned model and, for every prunable tensor, the base and fine-tuned values it rewrites the
model from (:class:`deltakit.resident.ResidentModel`). Where those values live is the *tier*; every tier writes the
same bits (same masks from the same keys, same fp32 maths per tensor, one cast):

* ``resident``: base and fine-tune copies beside the model, on its device (fastest; ~3x the prunable bytes);
* ``host``: the model on a CUDA device, base and fine-tune in pinned host memory, copied to the device one tensor
  at a time per point (the next tensor's copy overlaps the current one's compute); on CPU it is ``resident``;
* ``file``: base and fine-tune read per tensor per point from their safetensors files, with positioned reads
  through the page cache (which does the caching without counting in the process's memory); only the model and
  one tensor's working set are resident.

On CPU the uniform numbers of each seed's masks can also be kept (4 bytes per prunable parameter per seed); it is
an option inside the budget, never assumed: without it the counter-based generator makes them again per point.

:func:`plan_memory` estimates, before anything loads, what each (tier, cache) choice needs in host and device
memory, and picks the fastest that fits the budget; :class:`MemoryBudgetError` names the smallest budget that
would work. :class:`PeakMemory` measures what a sweep really used (the peak resident set of the process, and on
CUDA the peak allocated device memory).
"""

from __future__ import annotations

import math
import os
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["TIERS", "Budget", "Footprint", "MemoryBudgetError", "MemoryPlan", "PeakMemory", "format_size",
           "is_out_of_memory", "parse_budget", "parse_size", "plan_memory"]

TIERS = ("resident", "host", "file")  # fastest first
TIER_NAMES = {"resident": "resident", "host": "host-streamed", "file": "file-streamed"}
HOST_FRACTION, DEVICE_FRACTION = 0.8, 0.9  # of the available host memory / free device memory: the default budget
EVAL_ALLOWANCE = 512 * 2**20  # the evaluation's activations and the loader's buffers, on the model's device
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_EXAMPLE = "e.g. '5GB', '5GiB', '5000MB' or, per device, 'cpu=32GB,cuda=20GB'"


class MemoryBudgetError(ValueError):
    """No tier fits the memory budget, or the budget is malformed; the message names the value and the fix."""


def parse_size(value: str | int | float, *, what: str = "memory budget") -> int:
    """Bytes in a size: an int (bytes) or a string with a unit (``5GB`` = 5e9, ``5GiB`` = ``5G`` = 5 * 2**30).

    Raises:
        MemoryBudgetError: no unit, an unknown unit, a negative, zero, NaN or non-numeric value.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MemoryBudgetError(f"{what} {value!r} is not a size: give a string with a unit, {_EXAMPLE}.")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise MemoryBudgetError(f"{what} {value!r} must be a whole, positive number of bytes ({_EXAMPLE}).")
        return int(value)
    m = _SIZE.match(value)
    if m is None and value.strip().startswith("-"):
        raise MemoryBudgetError(f"{what} {value!r} must be more than zero ({_EXAMPLE}).")
    if m is None:
        unitless = value.strip().replace(".", "", 1).isdigit()
        hint = " has no unit" if unitless else " is not a size"
        raise MemoryBudgetError(f"{what} {value!r}{hint}: write a number and a unit, {_EXAMPLE}.")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise MemoryBudgetError(f"{what} {value!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB (powers of "
                                f"10) or KiB, MiB, GiB, TiB (powers of 2), {_EXAMPLE}.")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise MemoryBudgetError(f"{what} {value!r} must be more than zero ({_EXAMPLE}).")
    return size


def format_size(n: float) -> str:
    """``5.37 GB`` (powers of 10, as budgets are usually written)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    """How much memory a sweep may use: on the host (the whole process's resident set) and on a CUDA device.

    Attributes:
        host: bytes of host memory. device: bytes of CUDA memory (None on CPU). source: how it was set (stated
        with every plan).
    """

    host: int
    device: int | None
    source: str


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation now (``MemAvailable``; the physical size elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def current_rss() -> int:
    """Bytes of this process's resident set now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_budget(value: str | int | Mapping[str, str | int] | None, device: torch.device) -> Budget:
    """The budget of a sweep on ``device``.

    Args:
        value: None: the default, this process's memory now plus 80% of the host memory available, and on CUDA
            90% of the device's free memory. A size (``"5GB"``, bytes as an int): the budget of the device the model
            lives on (the host on CPU; on CUDA the GPU, the host keeping its default). Both, as
            ``"cpu=32GB,cuda=20GB"`` or ``{"cpu": "32GB", "cuda": "20GB"}``.
        device: where the model lives.

    Raises:
        MemoryBudgetError: a malformed size, an unknown key, or a device budget on a CPU sweep.
    """
    cuda = device.type == "cuda"
    default_host = current_rss() + int(HOST_FRACTION * available_host_memory())
    default_device = int(DEVICE_FRACTION * torch.cuda.mem_get_info(device)[0]) if cuda else None
    if value is None:
        how = f"default: {HOST_FRACTION:.0%} of the available host memory"
        return Budget(default_host, default_device, how + (f", {DEVICE_FRACTION:.0%} of free {device}" if cuda else ""))
    if isinstance(value, str) and "=" in value:
        try:
            value = dict(part.split("=", 1) for part in value.split(",") if part.strip())
        except ValueError:
            raise MemoryBudgetError(f"memory budget {value!r}: write KEY=SIZE pairs separated by commas, {_EXAMPLE}.") \
                from None
    if isinstance(value, Mapping):
        host, dev = default_host, default_device
        for key, size in value.items():
            key = str(key).strip().lower()
            if key in ("cpu", "host"):
                host = parse_size(size, what=f"memory budget {key}=")
            elif key in ("cuda", "gpu", "device"):
                if not cuda:
                    raise MemoryBudgetError(f"memory budget {key}={size!r} is for a CUDA device, but this sweep runs "
                                            "on the CPU: give the host budget alone (e.g. '20GB') or run on cuda.")
                dev = parse_size(size, what=f"memory budget {key}=")
            else:
                raise MemoryBudgetError(f"memory budget: unknown key {key!r}; use cpu= and cuda=, {_EXAMPLE}.")
        return Budget(host, dev, "given: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    size = parse_size(value)
    shown = value if isinstance(value, str) else format_size(value)
    return Budget(default_host, size, f"given: {shown} of {device}") if cuda else \
        Budget(size, None, f"given: {shown}")


@dataclass(frozen=True)
class Footprint:
    """What one (tier, uniform cache) choice needs, in bytes."""

    tier: str
    cache_uniforms: bool
    host: int
    device: int  # 0 on CPU

    def fits(self, budget: Budget) -> bool:
        return self.host <= budget.host and (budget.device is None or self.device <= budget.device)

    @property
    def label(self) -> str:
        return TIER_NAMES[self.tier] + (" + uniform cache" if self.cache_uniforms else "")


@dataclass(frozen=True)
class MemoryPlan:
    """The tier a sweep chose, the budget it chose under, and every choice's estimate (fastest first)."""

    tier: str
    cache_uniforms: bool
    budget: Budget
    choices: tuple[Footprint, ...]
    forced: bool = False  # the caller named the tier
    fallbacks: list[str] = field(default_factory=list)  # why the tier was lowered mid-sweep

    @property
    def chosen(self) -> Footprint:
        return next(f for f in self.choices if (f.tier, f.cache_uniforms) == (self.tier, self.cache_uniforms))

    def describe(self) -> str:
        """One line: the tier, its estimate and the budget."""
        f, b = self.chosen, self.budget
        dev = f", device {format_size(f.device)} of {format_size(b.device)}" if b.device is not None else ""
        how = "chosen by the caller" if self.forced else "the fastest that fits"
        how = "; ".join(self.fallbacks) if self.fallbacks else how
        return (f"memory tier: {f.label} ({how}); estimate host {format_size(f.host)} of {format_size(b.host)}{dev} "
                f"(budget {b.source})")


def plan_memory(*, model_bytes: int, prunable_bytes: int, prunable_numel: int, working_bytes: int, n_seeds: int,
                device: torch.device, budget: Budget, baseline: int | None = None, tier: str | None = None,
                cache_uniforms: bool | None = None) -> MemoryPlan:
    """Estimate every (tier, uniform cache) choice and pick the fastest that fits ``budget``.

    Args:
        model_bytes: the model's parameters in the dtype it loads in. prunable_bytes / prunable_numel: the prunable
            tensors' bytes (in that dtype) and entries. working_bytes: one tensor's working set (reads, casts, fp32
            temporaries of the methods). n_seeds: seeds of the random methods (0: none; the cache holds each seed).
        device: where the model lives. budget: :func:`parse_budget`. baseline: host bytes the process holds
            before loading (default: now).
        tier / cache_uniforms: force a choice (still refused if it does not fit).

    Order: on CPU, resident + cache, file + cache, resident, file (regenerating the uniform numbers costs more than
    re-reading two tensors from the page cache); on CUDA, resident, host, file (masks are made in the kernel).

    Raises:
        MemoryBudgetError: no choice fits (the message gives each estimate and the smallest budget that works), or a
            forced tier does not fit or is unknown.
    """
    if tier is not None and tier not in TIERS:
        raise MemoryBudgetError(f"unknown memory tier {tier!r}; choose one of {', '.join(TIERS)}.")
    base = current_rss() if baseline is None else baseline
    cache = 4 * prunable_numel * n_seeds
    cuda = device.type == "cuda"
    working = working_bytes + EVAL_ALLOWANCE
    choices = []
    if cuda:  # the host holds the checkpoint's pages while the model loads, then what the tier keeps there
        on_device = model_bytes + 2 * working_bytes + EVAL_ALLOWANCE
        choices += [Footprint("resident", False, base + model_bytes, model_bytes + 2 * prunable_bytes + working),
                    Footprint("host", False, base + max(model_bytes, 2 * prunable_bytes + working_bytes), on_device),
                    Footprint("file", False, base + max(model_bytes, 2 * working_bytes), on_device)]
    else:
        resident = base + model_bytes + 2 * prunable_bytes + working
        streamed = base + model_bytes + working
        with_cache = [Footprint("resident", True, resident + cache, 0), Footprint("file", True, streamed + cache, 0)]
        choices += (with_cache if n_seeds else []) + [Footprint("resident", False, resident, 0),
                                                      Footprint("host", False, resident, 0),
                                                      Footprint("file", False, streamed, 0)]
    if not any(f.cache_uniforms for f in choices):
        cache_uniforms = None  # no choice has a cache (CUDA, or no random method): asking for one changes nothing
    wanted = [f for f in choices if (tier is None or f.tier == tier)
              and (cache_uniforms is None or f.cache_uniforms == cache_uniforms)]
    fitting = [f for f in wanted if f.fits(budget)]
    if not fitting:
        least = min(wanted, key=lambda f: (f.device, f.host))
        need = f"host {format_size(least.host)}" + (f" and {device} {format_size(least.device)}" if cuda else "")
        shown = "; ".join(f"{f.label}: host {format_size(f.host)}" + (f", device {format_size(f.device)}" if cuda
                                                                       else "") for f in wanted)
        have = f"host {format_size(budget.host)}" + (f", device {format_size(budget.device)}" if cuda else "")
        raise MemoryBudgetError(
            f"no memory tier fits the budget ({have}; {budget.source}). Estimates: {shown}. The smallest budget that "
            f"works is {need} ({least.label}): raise --max-memory / max_memory= to it, free memory, or use a "
            "machine with more.")
    pick = fitting[0]
    return MemoryPlan(pick.tier, pick.cache_uniforms, budget, tuple(choices), forced=tier is not None)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or host) that a lower tier may avoid."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError))


class PeakMemory:
    """The peak memory of this process from :meth:`reset` on: resident set (``VmHWM``), and CUDA allocations.

    Linux lets a process reset its own peak resident set (``/proc/self/clear_refs``); where that fails, the peak is
    the process's lifetime peak (``ru_maxrss``), which :attr:`since_reset` says.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.since_reset = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self.since_reset = True
        except OSError:
            self.since_reset = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def host(self) -> int:
        """Peak resident set in bytes."""
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def device_peak(self) -> int | None:
        """Peak CUDA bytes allocated (None on CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
