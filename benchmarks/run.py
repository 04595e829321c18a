"""Run every benchmark section: ``python benchmarks/run.py [section ...]``.

Each section prints medians after warm-up and ratios against a baseline measured in the
same run (threads fixed to 2). Sections: grads (issue 2), kron (issue 3), lowrank (issue 4),
makers (issue 5), others (issue 6), distributed (issue 7), shampoo_precision and adahessian (issue 16), when present.
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SECTIONS = {
    "grads": "bench_grads",
    "kron": "bench_kron",
    "lowrank": "bench_lowrank",
    "makers": "bench_makers",
    "others": "bench_others",
    "shampoo_precision": "bench_shampoo_precision",
    "adafisher": "bench_adafisher",
    "adahessian": "bench_adahessian",
    "distributed": "bench_distributed",
    "transformer": "bench_transformer",
    "guards": "bench_guards",
    "rows": "bench_rows",
    "operators": "bench_operators",
}


def main(argv: list[str]) -> None:
    wanted = argv or list(SECTIONS)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    for name in wanted:
        try:
            mod = importlib.import_module(SECTIONS[name])
        except ModuleNotFoundError as e:
            if e.name == SECTIONS[name]:
                print(f"\n[{name}: not present yet]")
                continue
            raise
        mod.main()


if __name__ == "__main__":
    main(sys.argv[1:])
