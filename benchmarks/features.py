"""Feature engineering: images/s on the 50,000 real CIFAR-10 training images in ../shared/data.

    python -m benchmarks.features [--runs 3]

verify-data uploads the archive once; each run then rebuilds the processed shards from scratch
(decode, split, statistics, safetensors shards, upload with sha256).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median, positive, write_result
from benchmarks.runs import SHARED_CIFAR
from components.feature_engineering import engineer_features
from components.verify_data import verify_data
from pipelines.cli import run_main
from pipelines.config import load_config
from pipelines.s3server import EmbeddedS3
from pipelines.storage import ObjectStore, parse_s3_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=positive(int), default=3, help="timed rebuilds (3)")
    args = parser.parse_args(argv)
    if not SHARED_CIFAR.exists():
        print(f"skipped: {SHARED_CIFAR} is absent (the real images this measures)")
        return 0
    # A damaged archive, a full disk: one line, as every step's error, not a traceback.
    return run_main(lambda: measure(args.runs))


def measure(runs: int) -> None:
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp,
        EmbeddedS3(Path(tmp) / "s3") as s3,
    ):
        overrides = {"dataset.name": "imagefolder", "dataset.source": str(SHARED_CIFAR)}
        cfg = load_config("quick", overrides={**overrides, "state_dir": tmp}, environ=s3.env())
        store = ObjectStore(cfg.storage)
        store.ensure_buckets()
        t0 = time.monotonic()
        verify_data(cfg, store)
        verify_s = time.monotonic() - t0
        for run in range(runs):
            t0 = time.monotonic()
            result = engineer_features(cfg, store)
            seconds = time.monotonic() - t0
            assert not result.skipped
            images = sum(result.counts.values())
            rows.append(
                {
                    "run": run + 1,
                    "images": images,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(images / seconds),
                }
            )
            print(rows[-1], flush=True)
            bucket, prefix = parse_s3_uri(result.processed_uri)
            for obj in list(store.list(bucket, prefix)):  # the next run starts from nothing
                store.remove(bucket, obj.key)
    summary = {
        "images_per_s_median": median([r["images_per_s"] for r in rows]),
        "seconds_median": median([r["seconds"] for r in rows]),
        "verify_data_first_upload_s": round(verify_s, 2),
    }
    path = write_result("feature_engineering", rows, summary=summary)
    print(summary, f"\n{path}")


if __name__ == "__main__":
    sys.exit(main())
