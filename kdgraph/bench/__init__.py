"""``kdgraph bench``: a suite of specs run for several seeds, and the results table they make.

    from kdgraph.bench import bench
    res = bench("benchmarks/suites/fashion_mnist.yaml", out="runs/bench_fm", seeds=3)
    res.row("KD").mean, res.row("KD").delta, res.row("KD").verdict

See :mod:`kdgraph.bench.suite` (the suite file), :mod:`kdgraph.bench.runner` (run folders, reuse,
failures) and :mod:`kdgraph.bench.report` (the table and its files). This is runtime: it uses
``kdgraph.train`` exactly as ``kdgraph train`` does.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
import types
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .report import BenchResults, Row, summarize, write_all
from .runner import execute, plan_runs
from .suite import LoadedSuite, Suite, SuiteEntry, load_suite


def _seeds(loaded: LoadedSuite, seeds: Union[int, Iterable[int], None]) -> list[int]:
    if seeds is None:
        return loaded.suite.seed_list()
    if isinstance(seeds, int):
        from ..errors import SpecError

        if seeds < 1:
            raise SpecError(f"--seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    return list(seeds)


def default_out(loaded: LoadedSuite) -> Path:
    name = loaded.path.stem if loaded.path is not None else "suite"
    return Path("runs") / f"bench_{name}"


def bench(suite: Union[str, Path, dict, Suite], *, data: Optional[str] = None, out: Union[str, Path, None] = None,
          seeds: Union[int, Iterable[int], None] = None, only: Optional[list[str]] = None, fresh: bool = False,
          device: Optional[str] = None, progress: Optional[bool] = None, jobs: int = 1,
          say: Optional[Callable[[str], None]] = None, command: Optional[str] = None) -> BenchResults:
    """Run (or continue) a suite and write its table into ``out``; returns the table.

    ``jobs``: runs trained at once on a CPU (worker processes; ignored under torchrun).
    Finished runs are reused (``fresh=True`` trains everything again); failed runs are in the table
    with their message (``res.failed``), never raised.
    """
    loaded = load_suite(suite)
    seed_list = _seeds(loaded, seeds)
    out_dir = Path(out) if out is not None else default_out(loaded)
    data = data if data is not None else loaded.suite.data
    runs = plan_runs(loaded, out_dir, seed_list, only)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs; rank 0 writes
    say = say or (lambda text: None)
    t0 = time.perf_counter()
    # under torchrun the processes join one group for the whole suite: gloo cannot re-join a group that each run
    # would otherwise create and destroy (the second run's connect is refused)
    from ..train.distributed import setup, teardown

    env = setup(device, group=True) if "WORLD_SIZE" in os.environ else None
    try:
        results = execute(runs, data=data, device=device, progress=progress, fresh=fresh, title=loaded.suite.title,
                          say=say if main else (lambda text: None), is_main=main,
                          jobs=1 if os.environ.get("WORLD_SIZE", "1") != "1" else jobs)
    finally:
        if env is not None:
            teardown(env)
    cmd = command or " ".join(shlex.quote(a) for a in ["kdgraph", *sys.argv[1:]])
    res = summarize(loaded, results, cmd, time.perf_counter() - t0, seed_list)
    if main:
        write_all(res, out_dir)
    return res


__all__ = ["bench", "BenchResults", "Row", "Suite", "SuiteEntry", "load_suite", "plan_runs"]


class _CallableModule(types.ModuleType):
    """``kdgraph.bench(suite, ...)`` works whether or not this subpackage was imported before: importing it
    binds the name ``bench`` of the ``kdgraph`` package to this module, so the module itself is callable."""

    def __call__(self, suite: Union[str, Path, dict, Suite], **kwargs) -> BenchResults:
        return bench(suite, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
