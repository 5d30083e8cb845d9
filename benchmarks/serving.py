"""Serving: batch-1 latency and throughput over HTTP against the model in-process.

    python -m benchmarks.serving [--seconds 1.5] [--repeats 3]

The model is the ResNet-18 the pipeline serves (the default stem, random weights: the speed does
not depend on their values), saved as training saves it and served by `python -m serving` with
the config's settings, once with micro-batching (max_batch from the config) and once without
(max_batch 1). A second process (benchmarks.loadgen) sends the load to 127.0.0.1. In-process,
the same ImageClassifier, with the server's thread count, runs `infer` (forward, softmax, top-k:
the work of one batch in the server) on 1 image for latency and on max_batch images for
throughput, with the served backend (serving.backend) and with each other one, in alternating
rounds. Throughput over HTTP is V1 batch-1 requests from 1, 4 and 16 closed-loop clients.
Figures are medians over the repeats; each repeat follows a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import numpy as np
import psutil

from benchmarks.common import ROOT, median, positive, write_result
from benchmarks.loadgen import REPLY_TIMEOUT_S
from components.deploy import start_server
from pipelines.config import PipelineConfig, ServingBackend, ServingConfig, load_config
from pipelines.processes import HOST, free_port, terminate
from serving.model import ImageClassifier
from serving.untrained import write_untrained_model

NAME = "bench"
CLASSES = [f"class{i}" for i in range(10)]
CLIENTS = (1, 4, 16)
PROTOCOLS = ("v1", "v2")
PERCENTILES = (50, 95, 99)
MIN_CALLS = 3  # timed per round, however short the round
BACKENDS = get_args(ServingBackend)


def flip_tta(cfg: PipelineConfig) -> bool:
    """Served as trained: with test-time flips where the config has them (twice the work)."""
    return bool(cfg.train.model_dump().get("flip_tta", False))


@contextmanager
def foreign_load(out: dict[str, float]) -> Iterator[None]:
    """The share of the machine's CPU that processes other than this benchmark (and the
    server and load generators it waited for) used meanwhile: the machine may be shared."""

    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    def mine() -> float:
        return sum(os.times()[:4])  # this process and its waited-for children

    start, busy0, mine0 = time.monotonic(), busy(), mine()
    yield
    other = busy() - busy0 - (mine() - mine0)
    capacity = (time.monotonic() - start) * (psutil.cpu_count() or 1)
    out["other_processes_cpu_share"] = round(max(0.0, other) / capacity, 3)


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    values = np.percentile(latencies_ms, PERCENTILES)
    return {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, values, strict=True)}


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(median([r[key] for r in rounds]), 2) for key in rounds[0]}


def timed(call: Callable[[], object], seconds: float, warmup_s: float = 0.5) -> list[float]:
    """Milliseconds of each call made during `seconds`, after `warmup_s` of untimed ones, and
    of MIN_CALLS at least: one batch-64 call outlasted a short window, which left none."""
    out: list[float] = []
    warm = time.perf_counter() + warmup_s
    deadline = warm + seconds
    while (t0 := time.perf_counter()) < deadline or len(out) < MIN_CALLS:
        call()
        if t0 >= warm:
            out.append((time.perf_counter() - t0) * 1000)
    return out


def in_process(model_dir: Path, cfg: PipelineConfig, seconds: float, repeats: int) -> dict:
    """Each backend's figures, the config's own first; their rounds alternate, so that a
    change in the machine's load falls on all of them alike."""
    sv = cfg.serving
    backends = [sv.backend, *(b for b in BACKENDS if b != sv.backend)]
    models = {}
    for backend in backends:
        model = ImageClassifier(NAME, model_dir, sv.model_copy(update={"backend": backend}))
        model.load()  # sets the server's intra-op thread count in this process
        models[backend] = model
    rng = np.random.default_rng(0)
    sizes = {"latency": 1, "batched": sv.max_batch, "clients": max(CLIENTS)}
    batches = {k: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for k, n in sizes.items()}
    rounds: dict[str, dict[str, list]] = {b: {key: [] for key in sizes} for b in backends}
    for _ in range(repeats):
        for backend, model in models.items():
            for key, batch in batches.items():
                ms = timed(lambda m=model, x=batch: m.infer(x), seconds)
                rounds[backend][key].append(ms)

    def images_per_s(backend: str, key: str) -> float:
        per_round = [len(ms) * sizes[key] * 1000 / sum(ms) for ms in rounds[backend][key]]
        return round(median(per_round), 1)

    return {
        backend: {
            "what": "ImageClassifier.infer: forward + softmax + top-k, as one server batch",
            "backend": backend,
            "threads": sv.threads,
            "latency_ms": median_of([percentiles(ms) for ms in rounds[backend]["latency"]]),
            "batch": sv.max_batch,
            "batched_images_per_s": images_per_s(backend, "batched"),
            # 16 clients with one image each make batches of 16 at most: their ceiling.
            f"batch_{max(CLIENTS)}_images_per_s": images_per_s(backend, "clients"),
        }
        for backend in backends
    }


@contextmanager
def served(model_dir: Path, cfg: PipelineConfig) -> Iterator[int]:
    port = free_port()
    proc = start_server(model_dir, NAME, port, cfg, model_dir.parent / f"server-{port}.log")
    try:
        yield port
    finally:
        terminate(proc)


def load(port: int, protocol: str, clients: int, seconds: float, repeats: int) -> list[dict]:
    """Rounds of `python -m benchmarks.loadgen`, a separate process."""
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--port", str(port), "--model", NAME]
    cmd += ["--protocol", protocol, "--clients", str(clients), "--seconds", str(seconds)]
    cmd += ["--repeats", str(repeats), "--warmup", "0.5"]
    limit = repeats * seconds + 0.5 + 2 * REPLY_TIMEOUT_S
    try:
        out = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=limit
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"loadgen did not finish within {limit:.0f} s") from None
    if out.returncode != 0:
        raise SystemExit(f"loadgen failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def batch_stats(port: int, model: str = NAME) -> tuple[float, float]:
    """(forward passes, images) so far, from the server's /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    values = {
        line.split("{")[0]: float(line.split()[-1])
        for line in lines
        if line.startswith("forward_batch_images_") and f'model_name="{model}"' in line
    }
    return values.get("forward_batch_images_count", 0.0), values.get("forward_batch_images_sum", 0)


def over_http(model_dir: Path, cfg: PipelineConfig, seconds: float, repeats: int) -> dict:
    figures: dict[str, Any] = {"max_batch": cfg.serving.max_batch, "latency_ms": {}}
    with served(model_dir, cfg) as port:
        for protocol in PROTOCOLS:
            rounds = load(port, protocol, 1, seconds, repeats)
            figures["latency_ms"][protocol] = median_of(
                [percentiles(r["latencies_ms"]) for r in rounds]
            )
        figures["throughput"] = []
        for clients in CLIENTS:
            passes, images = batch_stats(port)
            rounds = load(port, "v1", clients, seconds, repeats)
            after_passes, after_images = batch_stats(port)
            figures["throughput"].append(
                {
                    "clients": clients,
                    "images_per_s": round(median([r["images_per_s"] for r in rounds]), 1),
                    **median_of([percentiles(r["latencies_ms"]) for r in rounds]),
                    "mean_batch": round((after_images - images) / (after_passes - passes), 2),
                }
            )
    return figures


def summarize(by_backend: dict, batched: dict, unbatched: dict) -> dict[str, float]:
    local = next(iter(by_backend.values()))  # the served backend's
    forward_p50 = local["latency_ms"]["p50"]
    ratios = {
        f"p50_ratio_{p}": round(batched["latency_ms"][p]["p50"] / forward_p50, 3) for p in PROTOCOLS
    }
    top = {r["clients"]: r["images_per_s"] for r in batched["throughput"]}[max(CLIENTS)]
    flat = {r["clients"]: r["images_per_s"] for r in unbatched["throughput"]}[max(CLIENTS)]
    summary = {
        "p50_ratio": max(ratios.values()),  # the worse protocol
        **ratios,
        "throughput_ratio": round(top / local["batched_images_per_s"], 3),
        "throughput_ratio_unbatched": round(flat / local["batched_images_per_s"], 3),
        "throughput_ratio_ceiling": round(
            local[f"batch_{max(CLIENTS)}_images_per_s"] / local["batched_images_per_s"], 3
        ),
    }
    # The served backend against each other one, in-process: > 1 means it is faster.
    for name, other in list(by_backend.items())[1:]:
        speedup = other["latency_ms"]["p50"] / forward_p50
        summary[f"vs_{name}_p50_speedup"] = round(speedup, 3)
        batched_ratio = local["batched_images_per_s"] / other["batched_images_per_s"]
        summary[f"vs_{name}_batched_ratio"] = round(batched_ratio, 3)
    return summary


def report(by_backend: dict, batched: dict, unbatched: dict, summary: dict) -> None:
    top = max(CLIENTS)
    for name, local in by_backend.items():
        lat = local["latency_ms"]
        print(
            f"in-process infer ({name}), 1 image: p50 {lat['p50']} p95 {lat['p95']} "
            f"p99 {lat['p99']} ms; batch {local['batch']}: {local['batched_images_per_s']} "
            f"images/s; batch {top}: {local[f'batch_{top}_images_per_s']} images/s"
        )
    for label, figures in (("batched", batched), ("max_batch 1", unbatched)):
        for protocol, lat in figures["latency_ms"].items():
            print(
                f"HTTP {protocol} {label:>11}, 1 client: p50 {lat['p50']} p95 {lat['p95']} "
                f"p99 {lat['p99']} ms"
            )
        for row in figures["throughput"]:
            print(
                f"HTTP v1 {label:>11}, {row['clients']:>2} clients: {row['images_per_s']:>7} "
                f"images/s, p50 {row['p50']} ms, mean batch {row['mean_batch']}"
            )
    print(
        f"p50 HTTP / in-process: v1 {summary['p50_ratio_v1']}, v2 {summary['p50_ratio_v2']} "
        f"(target <= 1.5); 16 clients / in-process batched: {summary['throughput_ratio']} "
        f"batched, {summary['throughput_ratio_unbatched']} unbatched (target >= 0.70; batch "
        f"{top} in-process gives {summary['throughput_ratio_ceiling']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seconds", type=positive(float), default=1.5, help="per round and setting (default: 1.5)"
    )
    parser.add_argument("--repeats", type=positive(int), default=3, help="rounds (default: 3)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=ServingConfig().backend,
        help="the served backend, measured first (default: serving.backend's default, %(default)s)",
    )
    args = parser.parse_args(argv)
    served = {"serving.backend": args.backend}
    cfg = load_config(overrides=served, environ={})
    unbatched_cfg = load_config(overrides=served | {"serving.max_batch": 1}, environ={})
    started = time.monotonic()
    machine_load: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp,
        foreign_load(machine_load),
    ):
        model_dir = write_untrained_model(
            Path(tmp) / "model", CLASSES, cfg.train.stem, flip_tta=flip_tta(cfg)
        )
        by_backend = in_process(model_dir, cfg, args.seconds, args.repeats)
        batched = over_http(model_dir, cfg, args.seconds, args.repeats)
        unbatched = over_http(model_dir, unbatched_cfg, args.seconds, args.repeats)
    summary = summarize(by_backend, batched, unbatched)
    report(by_backend, batched, unbatched, summary)
    share = machine_load["other_processes_cpu_share"]
    print(f"other processes used {share:.0%} of the machine's CPU meanwhile")
    if share > 0.1:
        print("warning: the machine was not quiet, so these figures understate the server")
    path = write_result(
        "serving",
        {
            "in_process": by_backend[cfg.serving.backend],
            "in_process_by_backend": by_backend,
            "http_batched": batched,
            "http_unbatched": unbatched,
        },
        summary=summary,
        model={
            "arch": cfg.train.arch,
            "stem": cfg.train.stem,
            "flip_tta": flip_tta(cfg),
            "input": [3, 32, 32],
        },
        backend=cfg.serving.backend,
        payloads={
            "v1": "instances: [{image_bytes: {b64: PNG}}]",
            "v2": "one UINT8 [1,32,32,3] tensor, JSON data",
            "throughput": "v1, batch-1 requests, closed loop",
        },
        seconds_per_round=args.seconds,
        repeats=args.repeats,
        **machine_load,
        seconds=round(time.monotonic() - started, 1),
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
