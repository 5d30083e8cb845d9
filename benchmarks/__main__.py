"""`make bench`: every measurement in turn, then docs/BENCHMARKS.md from the results.

    python -m benchmarks [--only NAME ...] [--profiles quick,full]

Alone on the machine, all of it takes about 80 minutes, most of it the full profile's run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.common import profile_list

# (name, module, arguments): cheapest first, so a long run fails early on what is quick.
BENCHMARKS = {
    "throughput": ("benchmarks.train_throughput", []),
    "features": ("benchmarks.features", []),
    "serving": ("benchmarks.serving", []),
    "overhead": ("benchmarks.overhead", []),
    "accuracy": ("benchmarks.time_to_accuracy", []),
    "gpu": ("benchmarks.gpu_time_to_accuracy", []),  # skips, saying so, without CUDA
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), help="run these only (default: all)"
    )
    parser.add_argument(
        "--profiles",
        type=profile_list,
        default="quick,full",
        help="profiles for the accuracy run, comma-separated (default: quick,full)",
    )
    args = parser.parse_args(argv)
    for name in args.only or BENCHMARKS:
        module, extra = BENCHMARKS[name]
        if name == "accuracy":
            extra = ["--profiles", ",".join(args.profiles)]
        print(f"== {name}: python -m {module} {' '.join(extra)}", flush=True)
        code = importlib.import_module(module).main(extra)
        if code:
            return code
    return importlib.import_module("benchmarks.report").main([])


if __name__ == "__main__":
    sys.exit(main())
