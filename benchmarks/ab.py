"""Pipeline overhead, this checkout against another commit: alternating runs in one sitting.

    python -m benchmarks.ab REF [--pairs 3]

Shared machines drift by tens of percent within minutes, so two figures taken apart compare
badly. This runs the smoke pipeline from a git worktree of REF and from this checkout in
turn, with the same interpreter and packages, and reports the medians and their ratios (this
checkout over REF). Each checkout first runs once cold (data generated and uploaded); the
pairs that follow are warm re-runs, the first of each pair alternating.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, git_commit, median, positive, write_result
from benchmarks.overhead import ARGS
from benchmarks.runs import overhead_row, run_pipeline


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def resolve(ref: str) -> str:
    """The commit REF names; ValueError says why it cannot be compared."""
    found = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if found.returncode != 0:
        raise ValueError(f"{ref!r} names no commit here: pass a hash, tag or branch")
    commit = found.stdout.strip()
    theirs = git("show", f"{commit}:requirements.txt").stdout
    if theirs != (ROOT / "requirements.txt").read_text():
        # One interpreter runs both sides: with other pins, REF would run on the wrong packages.
        raise ValueError(
            f"{ref} pins other packages than this checkout (requirements.txt differs): "
            "compare commits that share requirements.txt"
        )
    return commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ref", help="the commit to compare against (a hash, tag or branch)")
    parser.add_argument(
        "--pairs", type=positive(int), default=3, help="warm pairs after the cold runs (3)"
    )
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: at least one warm pair is needed for a median")
    try:
        commit = resolve(args.ref)
    except ValueError as exc:
        parser.error(str(exc))  # exit code 2, before anything runs
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mlops-ab-") as tmp:
        tree = Path(tmp) / "ref"
        added = git("worktree", "add", "--detach", str(tree), commit)
        if added.returncode != 0:
            print(f"error: git worktree add failed: {added.stderr.strip()}", file=sys.stderr)
            return 1
        sides = {"ref": tree, "this": ROOT}
        try:
            order = [*sides]  # the cold runs, then warm pairs, each pair's first alternating
            for i in range(args.pairs):
                order += ["ref", "this"] if i % 2 == 0 else ["this", "ref"]
            for n, side in enumerate(order):
                report = run_pipeline(ARGS, Path(tmp) / f"state-{side}", root=sides[side])
                row = {"run": "cold" if n < len(sides) else "warm", "side": side}
                rows.append(row | overhead_row(report))
                print(rows[-1], flush=True)
        finally:
            git("worktree", "remove", "--force", str(tree))
    warm = [r for r in rows if r["run"] == "warm"]
    keys = [k for k in rows[0] if k.endswith("_s")]
    medians = {
        side: {k: round(median([r[k] for r in warm if r["side"] == side]), 2) for k in keys}
        for side in sides
    }
    summary = {
        "ref": args.ref if commit.startswith(args.ref) else f"{args.ref} ({commit[:7]})",
        "this": git_commit(),
        "medians": medians,
        "ratio_this_over_ref": {
            k: round(medians["this"][k] / medians["ref"][k], 3) for k in keys if medians["ref"][k]
        },
    }
    path = write_result("pipeline_overhead_ab", rows, summary=summary, args=" ".join(ARGS))
    print(summary, f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
