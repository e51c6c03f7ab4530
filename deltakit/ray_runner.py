"""Sweeps on a Ray cluster: one actor per GPU (or per CPU slot) keeps the model resident and runs points.

``sweep(spec, options, runner=RayRunner(address))`` runs the same points as the in-process sweep and gives the same
keys and results. The driver (the process that calls :func:`deltakit.sweep.sweep`) plans the points, skips those
already in the results store, hands the rest to the workers and appends each record as it arrives: it is the only
writer of the store, so a driver killed and restarted resumes from the store with nothing lost or duplicated.

What goes to a worker: the spec with the models as *references* (a family member, a folder path, or a Hub
``repo_id@commit`` pinned by the driver's snapshot), the run options, and the evaluators and calibration texts the
caller passed (pickled; a custom evaluator must be picklable). Never tensors, never a token: each worker resolves the
models itself and reads ``HF_TOKEN`` / its Hugging Face login from its own environment. Each worker builds its own
:class:`~deltakit.sweep.SweepWorker` once and reports the key parts (the models' content fingerprints, the paired
preset, the evaluator's fingerprint); the driver refuses to run when a worker disagrees with it or with another.

Order: pending points are grouped by seed and a worker is given points of the seed it ran last, so it reuses its
cached uniform numbers (:class:`~deltakit.resident.ResidentModel`'s ``cache_uniforms``). A worker that dies (its
process killed, its node lost: ``ray.exceptions.RayActorError``) has its point retried on another worker, at most
``max_retries`` times, then recorded as failed with the error; a replacement worker is started while the budget of
``max_retries`` per worker lasts.

Ray is an optional extra (``pip install 'deltakit[ray]'``): this module imports it only when a runner opens.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from deltakit.refs import Snapshot
from deltakit.spec import MethodSpec, RunOptions, SweepSpec
from deltakit.store import fingerprint
from deltakit.sweep import Evaluator, RunningSweep, SweepWorker, evaluator_fingerprint, failed_record

__all__ = ["INSTALL_HINT", "RayRunner", "RayWorkerError", "ray_installed"]

INSTALL_HINT = "Ray is not installed: pip install 'deltakit[ray]' (or 'ray>=2.40'), or run the sweep in process."

Point = tuple[MethodSpec, float, int]


class RayWorkerError(RuntimeError):
    """A Ray worker could not load the sweep, disagrees with the driver about the models, or none is left."""


def ray_installed() -> bool:
    """Whether Ray can be imported (checked without importing it)."""
    return importlib.util.find_spec("ray") is not None


def _reference(model: Any) -> tuple[str, bool]:
    """What a worker resolves for a model: (reference, stream). A Hub snapshot is pinned to its commit."""
    if isinstance(model, Snapshot):
        if model.kind == "hub" and model.repo_id and model.commit:
            return f"{model.repo_id}@{model.commit}", model.streamed
        return (model.ref if model.kind == "family" else str(model.path)), False
    return os.fspath(model), False


def _label(model: Any) -> str:
    """The model reference as the in-process sweep records it (:attr:`deltakit.refs.Snapshot.ref`)."""
    return model.ref if isinstance(model, Snapshot) else os.fspath(model)


class _SweepActor:
    """The body of a Ray actor: resolves the models itself, builds one :class:`SweepWorker`, runs points."""

    def __init__(self, spec: SweepSpec, models: tuple[tuple[str, bool], tuple[str, bool]], options: RunOptions,
                 evaluator: Evaluator | None, search_evaluator: Evaluator | None,
                 calibration_texts: Sequence[str] | None) -> None:
        from deltakit.sources import resolve

        base, fine_tune = (resolve(ref, stream=stream) for ref, stream in models)
        spec = dataclasses.replace(spec, base=base, fine_tune=fine_tune)
        self.worker = SweepWorker(spec, options, options.check(), evaluator=evaluator,
                                  search_evaluator=search_evaluator, calibration_texts=calibration_texts)

    def describe(self) -> dict[str, Any]:
        return dict(common=self.worker.common, memory=self.worker.memory, pid=os.getpid())

    def run(self, point: Point) -> dict[str, Any]:
        return self.worker.run(point)


@dataclasses.dataclass(eq=False)
class _Slot:
    """One live worker: its actor handle and the seed of the last point it ran (its cached uniform numbers)."""

    actor: Any
    seed: int | None = None


class RayRunner:
    """Run a sweep's points on Ray workers, one resident model per worker (see the module docstring).

    Args:
        address: the cluster to attach to (``ray://HOST:10001``, ``HOST:6379``, ``auto``); None attaches to the Ray
            instance this process already has, else to a local cluster started with ``ray start``, else starts a
            local instance for the sweep (shut down after it).
        workers: how many workers (actors); default one per GPU of the cluster (``device="cuda"``) or one per
            ``cpus_per_worker`` CPUs, never more than the sweep has points.
        cpus_per_worker: CPUs reserved for each worker (its torch thread count follows Ray's OMP_NUM_THREADS).
        runtime_env: a Ray runtime environment for the workers (e.g. ``{"env_vars": {"DELTAKIT_HOME": ...}}``);
            it must not carry a token: workers read theirs from their own environment.
        max_retries: how often a point whose worker died is retried on another worker before it is recorded as
            failed; also the number of replacement workers started per worker.

    Raises:
        ImportError: Ray is not installed (the message says how to install it).
        ValueError: a bad number, or a token in ``runtime_env``.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, *, cpus_per_worker: float = 1.0,
                 runtime_env: dict[str, Any] | None = None, max_retries: int = 2) -> None:
        if not ray_installed():
            raise ImportError(INSTALL_HINT)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive number of Ray workers or None (one per device), got "
                             f"{workers!r}.")
        if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, (int, float)) or cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be a positive number, got {cpus_per_worker!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}.")
        secrets = [k for k in (runtime_env or {}).get("env_vars", {}) if "TOKEN" in k.upper()]
        if secrets:
            raise ValueError(f"runtime_env would send {', '.join(secrets)} to the workers: tokens are never sent; set "
                             "them in the workers' own environment (e.g. before `ray start`) or log in there.")
        self.address = address or None
        self.workers = workers
        self.cpus_per_worker = float(cpus_per_worker)
        self.runtime_env = dict(runtime_env or {})
        self.max_retries = max_retries

    def __repr__(self) -> str:
        return f"RayRunner(address={self.address!r}, workers={self.workers!r})"

    def check(self, options: RunOptions) -> None:
        """Refuse, on the driver, run options no worker can use; the workers check the rest on their device.

        Raises:
            ValueError: not ``cpu`` or ``cuda`` (Ray gives each worker one GPU, so ``cuda:N`` is refused).
            deltakit.memory.MemoryBudgetError: an unknown memory tier.
        """
        from deltakit.memory import TIERS, MemoryBudgetError

        if options.device not in ("cpu", "cuda"):
            raise ValueError(f"device {options.device!r}: with Ray use 'cpu' or 'cuda' (each worker gets its own GPU "
                             "from Ray, so 'cuda:N' does not apply).")
        if options.tier is not None and options.tier not in TIERS:
            raise MemoryBudgetError(f"unknown memory tier {options.tier!r}; choose one of {', '.join(TIERS)}.")

    @contextlib.contextmanager
    def open(self, spec: SweepSpec, options: RunOptions, *, evaluator: Evaluator | None = None,
             search_evaluator: Evaluator | None = None, calibration_texts: Sequence[str] | None = None,
             resident: Any = None) -> Iterator[RunningSweep]:
        """Start the workers, wait until each has loaded the sweep, and check they agree with the driver.

        Raises:
            ValueError: ``resident`` given (a model in this process cannot be shared with workers).
            TypeError: an evaluator or the calibration texts cannot be pickled for the workers.
            RayWorkerError: a worker could not load the sweep, or disagrees about the models or the evaluator.
        """
        if resident is not None:
            raise ValueError("resident= is a model loaded in this process; Ray workers load their own: drop "
                             "resident= or run the sweep in process.")
        import ray

        sent = dict(evaluator=evaluator, search_evaluator=search_evaluator,
                    calibration_texts=None if calibration_texts is None else list(calibration_texts))
        for name, value in sent.items():
            if value is not None:
                try:
                    ray.cloudpickle.dumps(value)
                except Exception as err:
                    raise TypeError(f"{name} {value!r} cannot be sent to Ray workers ({type(err).__name__}: {err}): "
                                    "define it at module level in a module the workers can import (or make it "
                                    "picklable), or run the sweep in process.") from None
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True)
        pool = None
        try:
            models = (_reference(spec.base), _reference(spec.fine_tune))
            worker_spec = dataclasses.replace(spec, base=models[0][0], fine_tune=models[1][0])
            worker_options = dataclasses.replace(options, out=None, wait=False, progress=False)
            expected = {name: fingerprint(model) for name, model in (("base", spec.base),
                                                                      ("fine_tune", spec.fine_tune))
                        if isinstance(model, Snapshot)}
            if evaluator is not None:  # the in-process sweep keys a custom evaluator by the caller's object
                expected["evaluator"] = evaluator_fingerprint(evaluator)
            actor_options: dict[str, Any] = dict(num_cpus=self.cpus_per_worker)
            if options.device == "cuda":
                actor_options["num_gpus"] = 1
            if self.runtime_env:
                actor_options["runtime_env"] = self.runtime_env
            remote = ray.remote(_SweepActor).options(**actor_options)
            pool = _Pool(ray, lambda: remote.remote(worker_spec, models, worker_options, evaluator,
                                                    search_evaluator, sent["calibration_texts"]),
                         expected, self.max_retries)
            n = min(self._capacity(ray, options.device), len(spec.points()))
            common, memory = pool.start(max(1, n))
            if options.progress:
                print(f"deltakit: {n} Ray worker(s); each: {memory}", file=sys.stderr, flush=True)
            labels = dict(base=_label(spec.base), fine_tune=_label(spec.fine_tune))
            yield RunningSweep(common, labels, lambda: f"{n} Ray worker(s); each: {memory}", pool.dispatch)
        finally:
            if pool is not None:
                pool.close()
            if started:
                ray.shutdown()

    def _capacity(self, ray: Any, device: str) -> int:
        """The number of workers: as asked, else one per GPU (cuda) or per ``cpus_per_worker`` CPUs."""
        resources = ray.cluster_resources()
        if device == "cuda":
            room = int(resources.get("GPU", 0))
            if room == 0:
                raise RayWorkerError("device 'cuda' but the Ray cluster has no GPU: attach to a cluster with GPUs "
                                     "(--ray ADDRESS) or use device 'cpu'.")
        else:
            room = max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))
        if self.workers is not None and self.workers > room:
            warnings.warn(f"deltakit: {self.workers} Ray workers asked for, the cluster has room for {room} now; the "
                          "others start when resources free up (or the cluster scales up).", stacklevel=3)
        return self.workers or room


class _Pool:
    """The driver's view of the workers: starts them, checks what they report, hands out points by seed."""

    def __init__(self, ray: Any, make: Any, expected: dict[str, str], max_retries: int) -> None:
        self.ray = ray
        self.make = make
        self.expected = expected
        self.max_retries = max_retries
        self.common: dict[str, Any] | None = None
        self.slots: list[_Slot] = []
        self.starting: dict[Any, _Slot] = {}
        self.replacements = 0
        self.budget = 0

    def _launch(self) -> None:
        slot = _Slot(self.make())
        self.starting[slot.actor.describe.remote()] = slot

    def _admit(self, ref: Any) -> str:
        """A starting worker has answered: check its key parts, make it available; returns its memory plan."""
        slot = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:
            raise RayWorkerError(f"a Ray worker could not load the sweep: {err}") from None
        common = dict(info["common"])
        for name, value in self.expected.items():
            if name != "evaluator" and common.get(name) != value:
                raise RayWorkerError(f"a Ray worker (pid {info['pid']}) loaded {name} {common.get(name)!r}, the driver "
                                     f"has {value!r}: give the workers the same model files (or pin the Hub "
                                     "revision) and rerun.")
        if "evaluator" in self.expected:
            common["evaluator"] = self.expected["evaluator"]
        if self.common is None:
            self.common = common
        elif common != self.common:
            diff = sorted(k for k in set(common) | set(self.common) if common.get(k) != self.common.get(k))
            raise RayWorkerError(f"Ray workers disagree about {', '.join(diff)} ({common} vs {self.common}): they "
                                 "must see the same models, data and deltakit version; fix the workers' "
                                 "environment and rerun.")
        self.slots.append(slot)
        return info["memory"]

    def start(self, n: int) -> tuple[dict[str, Any], str]:
        """Start ``n`` workers and wait until all have loaded; returns the agreed key parts and a memory plan."""
        for _ in range(n):
            self._launch()
        memory = ""
        while self.starting:
            ready, _ = self.ray.wait(list(self.starting), num_returns=1)
            memory = self._admit(ready[0])
        if self.common is None:
            raise RayWorkerError("no Ray worker started: ask for at least one worker.")
        self.budget = self.max_retries * n
        return self.common, memory

    def dispatch(self, pending: Sequence[tuple[int, Point]],
                 cancel: threading.Event | None) -> Iterator[tuple[int, dict[str, Any]]]:
        """Run the pending points on the workers, grouped by seed; yield (index, record) as each finishes."""
        ray = self.ray
        queues: dict[int, collections.deque] = {}
        for index, point in pending:  # seeds in order of first appearance, points in run order within a seed
            queues.setdefault(point[2], collections.deque()).append((index, point))
        attempts: collections.Counter = collections.Counter()
        in_flight: dict[Any, tuple[_Slot, int, Point]] = {}
        idle = list(self.slots)
        last_error: BaseException | None = None
        while True:
            stopping = cancel is not None and cancel.is_set()
            while idle and not stopping and any(queues.values()):
                slot = idle.pop(0)
                index, point = self._next(queues, slot, idle, in_flight)
                slot.seed = point[2]
                in_flight[slot.actor.run.remote(point)] = (slot, index, point)
            if not in_flight:
                if stopping or not any(queues.values()):
                    return
                if not self.starting:
                    raise RayWorkerError(f"no Ray worker is left ({last_error}); finished points are stored: "
                                         "rerun the sweep to resume.")
            ready, _ = ray.wait(list(in_flight) + list(self.starting), num_returns=1)
            ref = ready[0]
            if ref in self.starting:
                try:
                    self._admit(ref)
                    idle.append(self.slots[-1])
                except RayWorkerError as err:  # a replacement that cannot load: carry on with the others
                    last_error = err
                continue
            slot, index, point = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                last_error = err
                self.slots.remove(slot)
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor)
                attempts[index] += 1
                if attempts[index] > self.max_retries:
                    yield index, failed_record(point, f"Ray worker died {attempts[index]} times running this "
                                                      f"point: {type(err).__name__}: {str(err).splitlines()[0]}")
                else:
                    queues[point[2]].appendleft((index, point))
                if self.replacements < self.budget:
                    self.replacements += 1
                    self._launch()
                continue
            idle.append(slot)
            yield index, record

    @staticmethod
    def _next(queues: dict[int, collections.deque], slot: _Slot, idle: list[_Slot],
              in_flight: dict[Any, tuple[_Slot, int, Point]]) -> tuple[int, Point]:
        """The next point for ``slot``: its last seed's if any are left, else a seed no other worker is on, else the
        seed with the most points left."""
        if slot.seed is not None and queues.get(slot.seed):
            return queues[slot.seed].popleft()
        taken = {s.seed for s, _, _ in in_flight.values()} | {s.seed for s in idle}
        free = [seed for seed, q in queues.items() if q and seed not in taken]
        seed = free[0] if free else max((s for s in queues if queues[s]), key=lambda s: len(queues[s]))
        return queues[seed].popleft()

    def close(self) -> None:
        """End every worker (their resources are free at once for the next sweep)."""
        for slot in [*self.slots, *self.starting.values()]:
            with contextlib.suppress(Exception):
                self.ray.kill(slot.actor)
        self.slots.clear()
        self.starting.clear()

