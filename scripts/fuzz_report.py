"""Print the spec fuzz table: cases per category and outcome (clear error, accepted valid, escaped, hang ...).

    PYTHONPATH=$PWD python scripts/fuzz_report.py [--compile-specs N] [--timeout S] [--show BAD]

Every mutation of tests/spec_mutations.py is applied to every shipped spec it fits; load-time mutations run
on all of them, compile-time ones on the first N specs they fit (each compile costs a second or two).
``--show`` lists the cases whose outcome is not a clear error / accepted valid spec.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import spec_mutations as sm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-specs", type=int, default=3, help="specs per compile-time mutation (default 3)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per load-only case before it is a hang")
    ap.add_argument("--compile-timeout", type=float, default=60.0, help="the same for a case that compiles")
    ap.add_argument("--show", action="store_true", help="list every case that is not a good outcome")
    a = ap.parse_args()
    bases = sm.load_bases()
    table: dict[str, collections.Counter] = {c: collections.Counter() for c in sm.CATEGORIES}
    bad: list[str] = []
    t0 = time.perf_counter()
    for mi, m in enumerate(sm.MUTATIONS):
        cases = sm.cases_for(m, bases)
        if m.compile or m.valid:
            # rotate which specs a compile-time mutation uses, so every spec is compiled by some mutation
            k = min(a.compile_specs, len(cases))
            start = (mi * k) % max(len(cases), 1)
            cases = (cases[start:] + cases[:start])[:k]
        for case in cases:
            with tempfile.TemporaryDirectory() as tmp:
                outcome, msg = sm.run_case(case, Path(tmp), a.timeout, a.compile_timeout)
            table[m.category][outcome] += 1
            if outcome not in sm.GOOD:
                bad.append(f"{outcome:17} {m.category:12} {m.name:40} {case.base.path.name:28} {msg[:110]!r}")
    width = max(len(o) for o in sm.OUTCOMES)
    print(f"{'category':14}" + "".join(f"{o:>{width + 1}}" for o in sm.OUTCOMES) + f"{'total':>7}")
    totals: collections.Counter = collections.Counter()
    for cat, counts in table.items():
        totals.update(counts)
        print(f"{cat:14}" + "".join(f"{counts[o]:>{width + 1}}" for o in sm.OUTCOMES) + f"{sum(counts.values()):>7}")
    print(f"{'all':14}" + "".join(f"{totals[o]:>{width + 1}}" for o in sm.OUTCOMES) + f"{sum(totals.values()):>7}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.show:
        print("\n".join(bad))


if __name__ == "__main__":
    main()
