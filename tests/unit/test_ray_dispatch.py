"""The Ray runner's scheduling, on a stand-in for Ray (no Ray needed): points grouped by seed per worker, a dead
worker's point retried on another, bounded retries, cancel, workers that disagree about the models."""

from __future__ import annotations

import threading
import types

import pytest

from deltakit.ray_runner import RayRunner, RayWorkerError, _Pool
from deltakit.spec import MethodSpec


class ActorDied(Exception):
    pass


class Ref:
    """A result computed when the driver asks for it (completion order = submission order)."""

    def __init__(self, call) -> None:
        self.call = call


class Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return Ref(lambda: self.fn(*args))


class Actor:
    def __init__(self, name: str, log: list, dies_on_call: int | None, common: dict) -> None:
        self.name, self.log, self.dies_on_call, self.common, self.calls = name, log, dies_on_call, common, 0
        self.run, self.describe = Method(self._run), Method(lambda: dict(common=common, memory="m", pid=name))

    def _run(self, point):
        self.calls += 1
        if self.calls == self.dies_on_call:
            raise ActorDied(f"{self.name} died")
        self.log.append((self.name, point[1], point[2]))
        return dict(method=point[0].name, rate=point[1], seed=point[2], status="ok", metrics={"m": 1.0})


def fake_ray() -> types.SimpleNamespace:
    return types.SimpleNamespace(wait=lambda refs, num_returns: (refs[:1], refs[1:]), get=lambda ref: ref.call(),
                                 kill=lambda actor: None, exceptions=types.SimpleNamespace(RayActorError=ActorDied))


def pool(deaths: dict[int, int] | None = None, *, max_retries: int = 2, commons: dict[int, dict] | None = None):
    """A pool whose n-th started worker dies on its call ``deaths[n]``; returns (pool, log of (worker, rate, seed))."""
    log: list = []
    started = iter(range(100))

    def make():
        n = next(started)
        return Actor(f"w{n}", log, (deaths or {}).get(n), (commons or {}).get(n, {"base": "sha:1"}))

    return _Pool(fake_ray(), make, {}, max_retries), log


def grid(rates=(0.1, 0.5, 0.9), seeds=(0, 1)) -> list[tuple[int, tuple]]:
    points = [(MethodSpec("dare"), r, s) for r in rates for s in seeds]  # rate-major, as SweepSpec.points()
    return list(enumerate(points))


def test_each_worker_keeps_to_one_seed_while_it_has_points():
    p, log = pool()
    p.start(2)
    done = dict(p.dispatch(grid(), None))
    assert sorted(done) == list(range(6)) and all(r["status"] == "ok" for r in done.values())
    seeds_by_worker = {w: {s for w2, _, s in log if w2 == w} for w, _, _ in log}
    assert seeds_by_worker == {"w0": {0}, "w1": {1}}


def test_a_dead_workers_point_runs_on_another_and_a_replacement_starts():
    p, log = pool({0: 2})  # w0 dies on its second point
    p.start(2)
    done = list(p.dispatch(grid(), None))
    assert sorted(i for i, _ in done) == list(range(6))  # every point once, none lost
    assert all(r["status"] == "ok" for _, r in done)
    assert ("w0", 0.5, 0) not in log and any(w != "w0" and (r, s) == (0.5, 0) for w, r, s in log)
    assert p.replacements == 1 and len(p.starting) + len(p.slots) == 2  # a replacement is on its way


def test_retries_are_bounded_then_the_point_is_recorded_failed():
    p, log = pool({0: 1}, max_retries=0)
    p.start(2)
    done = dict(p.dispatch(grid(), None))
    assert sorted(done) == list(range(6))
    assert done[0]["status"] == "failed" and "Ray worker died" in done[0]["error"]
    assert all(r["status"] == "ok" for i, r in done.items() if i != 0)


def test_no_worker_left_raises_and_says_the_store_keeps_what_finished():
    p, _ = pool({0: 1, 1: 1, 2: 1, 3: 1}, max_retries=1)
    p.start(1)
    with pytest.raises(RayWorkerError, match="rerun the sweep to resume"):
        list(p.dispatch(grid(), None))


def test_cancel_stops_handing_out_points():
    p, log = pool()
    p.start(2)
    cancel = threading.Event()
    got = []
    for index, _ in p.dispatch(grid(), cancel):
        got.append(index)
        cancel.set()
    assert len(got) == 2  # the point that finished, and the one in flight on the other worker
    assert len(log) == 2


def test_workers_that_disagree_about_the_models_are_refused():
    p, _ = pool(commons={1: {"base": "sha:2"}})
    with pytest.raises(RayWorkerError, match="disagree about base"):
        p.start(2)


def test_runner_arguments_are_checked():
    with pytest.raises(ValueError, match="workers must be a positive"):
        RayRunner(workers=0)
    with pytest.raises(ValueError, match="tokens are never sent"):
        RayRunner(runtime_env={"env_vars": {"HF_TOKEN": "secret"}})
