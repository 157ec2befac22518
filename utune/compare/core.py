"""``compare``: methods (specs) compared on one dataset with honest selection and several seeds.

For each method: every point of the grid is trained once (seed ``select_seed``) on the training data less a
validation split carved from it (``data.val_size``), and scored on that split; the best point (highest
validation accuracy, then lowest validation loss, then the first listed) is then trained on all the
training data with ``seeds`` seeds and scored on the test split. The test split is opened by final runs
only, so nothing about it can reach the choice. Scores are the final checkpoint's, never the best epoch's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from utune._signals import stop_requested
from utune.errors import Interrupted, UserInputError

from . import grid as gridlib
from .runner import RunTask, cached, execute, init_worker, load_task_spec
from .summary import summarise

DEFAULT_VAL_SIZE = 0.2  # VTAB-1k's 200 of 1,000


@dataclass
class Method:
    """One row of the comparison: a spec file, its label, overrides of its own and (optionally) its own grid."""

    spec: str | Path
    name: str | None = None
    overrides: Sequence[str] = ()
    grid: gridlib.Grid | None = None  # None: the comparison's grid

    @property
    def label(self) -> str:
        return self.name or Path(self.spec).stem


class CompareReporter(Protocol):
    """What a comparison tells its caller as it goes (the CLI prints it; the library prints nothing)."""

    def planned(self, total: int, reused: int) -> None: ...
    def started(self, index: int, total: int, task: RunTask, eta_s: float | None) -> None: ...
    def finished(self, index: int, total: int, task: RunTask, result: Mapping[str, Any]) -> None: ...


class _Silent:
    def planned(self, total: int, reused: int) -> None:
        pass

    def started(self, index: int, total: int, task: RunTask, eta_s: float | None) -> None:
        pass

    def finished(self, index: int, total: int, task: RunTask, result: Mapping[str, Any]) -> None:
        pass


@dataclass
class _Plan:
    method: Method
    spec_dict: dict[str, Any] | None = None
    error: str | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    select: list[RunTask] = field(default_factory=list)
    final: list[RunTask] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_dir -> result
    chosen: dict[str, Any] | None = None


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in text)


def _task(
    plan: _Plan, out: Path, kind: str, point: dict[str, Any], seed: int, common: Sequence[str], val: Any
) -> RunTask:
    """A run of ``plan``'s method; its folder name carries the resolved spec's hash (no collisions)."""
    from utune.spec import spec_hash

    data_keys = [f"data.val_size={val}"] if kind == "select" else ["data.val_size=null"]
    ov = (*common, *plan.method.overrides, *gridlib.as_overrides(point), f"train.seed={seed}", *data_keys)
    probe = kind == "final" and not plan.final
    draft = RunTask(plan.method.label, kind, str(plan.method.spec), ov, "", point, seed, probe)
    name = f"select-{gridlib.label(point)}" if kind == "select" else f"seed-{seed}"
    digest = spec_hash(load_task_spec(draft))[:8]
    run_dir = out / _safe(plan.method.label) / f"{_safe(name)}-{digest}"
    return RunTask(draft.method, kind, draft.spec, ov, str(run_dir), point, seed, probe)


def _plan_method(method: Method, grid: gridlib.Grid, common: Sequence[str], val_size: Any, out: Path) -> _Plan:
    from utune.errors import UtuneError
    from utune.spec import load_spec, spec_to_dict

    plan = _Plan(method)
    try:
        spec = load_spec(method.spec, [*common, *method.overrides])
        plan.spec_dict = spec_to_dict(spec)
        values = gridlib.resolve(method.grid if method.grid is not None else grid, plan.spec_dict)
        plan.points = gridlib.assignments(values) if values else []
        val = spec.data.val_size if spec.data.val_size is not None else val_size
        plan.select = [_task(plan, out, "select", p, 0, common, val) for p in plan.points]
    except UtuneError as e:
        plan.error = e.message + (f" ({e.hint})" if e.hint else "")
    return plan


def _choose(plan: _Plan) -> None:
    """The grid point with the best validation accuracy, then the lowest validation loss, then listed first."""
    scored = [(t, plan.results[t.run_dir]) for t in plan.select if "error" not in plan.results.get(t.run_dir, {})]
    if plan.points and not scored:
        errors = {str(e) for t in plan.select if (e := plan.results.get(t.run_dir, {}).get("error")) is not None}
        plan.error = "every selection run failed: " + "; ".join(sorted(errors))
        return
    if not plan.points:
        plan.chosen = {}
        return
    best = max(enumerate(scored), key=lambda it: (it[1][1]["acc"], -it[1][1]["loss"], -it[0]))
    plan.chosen = dict(best[1][0].point)


class _Runner:
    """Runs tasks (in this process, or in a pool of ``jobs`` processes) and keeps the count and the ETA."""

    def __init__(self, jobs: int, threads: int | None, reporter: CompareReporter, total: int) -> None:
        self.jobs, self.threads, self.reporter, self.total = jobs, threads, reporter, total
        self.index, self.spent, self.trained = 0, 0.0, 0
        self.pool: Any = None

    def eta(self, left: int) -> float | None:
        return self.spent / self.trained * left / self.jobs if self.trained else None

    def run(self, tasks: Sequence[RunTask], hashes: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for task in tasks:
            done = cached(task, hashes[task.run_dir])
            if done is not None:
                self.index += 1
                results[task.run_dir] = {**done, "reused": True, "task": task.__dict__}
                self.reporter.finished(self.index, self.total, task, results[task.run_dir])
            else:
                todo.append(task)
        if self.jobs <= 1:
            for task in todo:
                self._check_stop()
                results[task.run_dir] = self._one(task, functools.partial(execute, task))
            return results
        results.update(self._pooled(todo))
        self._check_stop()  # a SIGTERM to this process alone: the runs under way finished first
        return results

    def _check_stop(self) -> None:
        signum = stop_requested()
        if signum is not None:
            raise Interrupted(
                f"stopped after {self.index} of {self.total} runs; finished runs are kept",
                hint="run the same command again: finished runs are reused",
                signal_number=signum,
            )

    def _one(self, task: RunTask, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        self.reporter.started(self.index + 1, self.total, task, self.eta(self.total - self.index))
        result = work()
        self._account(task, result)
        return result

    def _account(self, task: RunTask, result: dict[str, Any]) -> None:
        if "interrupted" in result:
            raise Interrupted(
                f"interrupted during {task.method} ({task.kind}, {Path(task.run_dir).name}); finished runs are kept",
                hint="run the same command again: finished runs are reused, interrupted ones resume exactly",
                signal_number=int(result["interrupted"]),
            )
        self.index += 1
        if not result.get("reused"):
            self.spent += float(result.get("wall_s") or 0.0)
            self.trained += 1
        self.reporter.finished(self.index, self.total, task, result)

    def _pooled(self, todo: Sequence[RunTask]) -> dict[str, dict[str, Any]]:
        import concurrent.futures as cf
        import multiprocessing as mp

        if self.pool is None:
            ctx = mp.get_context("spawn")  # no fork of a process that holds torch threads
            self.pool = cf.ProcessPoolExecutor(
                self.jobs, mp_context=ctx, initializer=init_worker, initargs=(self.threads,)
            )
        queue, results = list(todo), cast(dict[str, Any], {})
        running: dict[cf.Future[Any], Any] = {}
        started = self.index
        while queue or running:
            while queue and len(running) < self.jobs:  # one task per free worker: "started" means started
                task = queue.pop(0)
                started += 1
                self.reporter.started(started, self.total, task, self.eta(self.total - self.index))
                running[self.pool.submit(execute, task)] = task
            done, _ = cf.wait(running, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            if stop_requested() is not None:
                queue.clear()  # the running ones got the signal too: they checkpoint and report back
            for future in done:
                task = running.pop(future)
                results[task.run_dir] = future.result()
                self._account(task, results[task.run_dir])
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def compare(
    methods: Sequence[Method | str | Path],
    *,
    out: Path,
    seeds: int = 3,
    grid: gridlib.Grid | None = None,
    overrides: Sequence[str] = (),
    val_size: int | float = DEFAULT_VAL_SIZE,
    jobs: int = 1,
    threads: int | None = None,
    reporter: CompareReporter | None = None,
) -> dict[str, Any]:
    """Compare ``methods`` on the data their specs (and ``overrides``, e.g. ``data.dataset=digits``) name.

    ``grid``: ``{key: [values]}`` chosen on the validation split (``"0.3x"``: 0.3 times the spec's value);
    ``seeds``: final runs per method (seeds ``0..seeds-1``); ``val_size``: the validation split carved
    from the training data when a spec sets no ``data.val_size``. Runs live under ``out`` and are reused
    when repeated. Returns the comparison (also ``out/compare.json``, ``compare.md`` and two plots).
    """
    if seeds < 1:
        raise UserInputError(f"--seeds must be at least 1, got {seeds}", hint="use 3 or more for an interval")
    if jobs < 1:
        raise UserInputError(f"--jobs must be at least 1, got {jobs}")
    t0 = time.perf_counter()
    items = [m if isinstance(m, Method) else Method(m) for m in methods]
    _unique_labels(items)
    out = Path(out)
    plans = [_plan_method(m, grid or {}, overrides, val_size, out) for m in items]
    live = [p for p in plans if p.error is None]
    total = sum(len(p.select) + seeds for p in live)
    reporter = reporter or _Silent()
    runner = _Runner(jobs, threads, reporter, total)
    try:
        _run_all(plans, live, runner, out, seeds, overrides, reporter)
    finally:
        runner.close()
    settings = {"seeds": seeds, "grid": grid or {}, "overrides": list(overrides), "val_size": val_size, "jobs": jobs}
    return summarise(plans, out, settings, wall_s=time.perf_counter() - t0)


def _run_all(
    plans: list[_Plan],
    live: list[_Plan],
    runner: _Runner,
    out: Path,
    seeds: int,
    overrides: Sequence[str],
    reporter: CompareReporter,
) -> None:
    from utune.spec import spec_hash

    selects = [t for p in live for t in p.select]
    hashes = {t.run_dir: spec_hash(load_task_spec(t)) for t in selects}
    reused = sum(cached(t, hashes[t.run_dir]) is not None for t in selects)
    reporter.planned(runner.total, reused)
    results = runner.run(selects, hashes)
    for plan in live:
        plan.results.update({t.run_dir: results[t.run_dir] for t in plan.select})
        _choose(plan)
        if plan.error is None:
            plan.final = []
            for seed in range(seeds):
                plan.final.append(_task(plan, out, "final", plan.chosen or {}, seed, overrides, None))
        else:
            runner.total -= seeds
    finals = [t for p in live for t in p.final]
    results = runner.run(finals, {t.run_dir: spec_hash(load_task_spec(t)) for t in finals})
    for plan in live:
        plan.results.update({t.run_dir: results[t.run_dir] for t in plan.final})


def _unique_labels(items: Sequence[Method]) -> None:
    seen: dict[str, str] = {}
    for m in items:
        if m.label in seen:
            raise UserInputError(
                f"two methods are both called {m.label!r} ({seen[m.label]} and {m.spec})",
                hint="give the spec files different names",
            )
        seen[m.label] = str(m.spec)
