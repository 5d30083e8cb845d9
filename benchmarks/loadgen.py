"""Load generator for the serving benchmark: C keep-alive clients send batch-1 requests.

    python -m benchmarks.loadgen --port 8080 --model NAME --protocol v2 --clients 16 --seconds 2

It runs in its own process, so the client's CPU time is not the server's. Each client owns one
HTTP/1.1 connection and sends its next request when the last answer arrives (closed loop).
Prints one JSON line: per timed round, each request's latency in ms, the seconds and images/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import uvloop
from PIL import Image

from benchmarks.common import positive

HOST = "127.0.0.1"
PROTOCOLS = ("v1", "v2")
REPLY_TIMEOUT_S = 60  # a batch-1 request takes milliseconds


def request_bytes(protocol: str, model: str, port: int, image: np.ndarray) -> bytes:
    """One whole HTTP request: V1 instances with a base64 PNG, or a V2 UINT8 tensor in JSON
    (JSON, as the recorded figures were taken: KServe 0.21 made a binary V2 tensor a Python
    list, which the model server no longer does)."""
    if protocol == "v1":
        png = io.BytesIO()
        # A 1-channel image (MNIST's) is a grey PNG: PIL takes no (H, W, 1) array.
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, "png")
        b64 = base64.b64encode(png.getvalue()).decode()
        path, body = f"/v1/models/{model}:predict", {"instances": [{"image_bytes": {"b64": b64}}]}
    else:
        tensor = {"name": "images", "datatype": "UINT8", "shape": [1, *image.shape]}
        path, body = (
            f"/v2/models/{model}/infer",
            {"inputs": [{**tensor, "data": image.ravel().tolist()}]},
        )
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    """Send one request on a kept-alive connection; the status once the whole answer is read."""
    writer.write(raw)
    try:
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
    except (IndexError, ValueError, asyncio.IncompleteReadError, ConnectionError):
        # An empty or cut-short answer, or a reset: the server closed the connection (it
        # stopped, or died).
        raise LoadError("the server closed the connection without a whole answer") from None
    return status


async def client(
    port: int, raws: list[bytes], warmup_s: float, rounds: list[Round], timeout_s: float
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    sent = 0

    async def until(deadline: float, latencies_ms: list[float] | None) -> None:
        nonlocal sent
        while (t0 := time.perf_counter()) < deadline:
            await checked(reader, writer, raws[sent % len(raws)], timeout_s)
            sent += 1
            if latencies_ms is not None:
                latencies_ms.append((time.perf_counter() - t0) * 1000)

    try:
        await until(time.perf_counter() + warmup_s, None)
        for one in rounds:
            await one.start.wait()
            await until(time.perf_counter() + one.seconds, one.latencies_ms)
            await one.done.wait()
    finally:
        writer.close()


async def checked(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes, timeout_s: float
) -> None:
    try:
        # A server that stops answering held the benchmark for good.
        status = await asyncio.wait_for(exchange(reader, writer, raw), timeout_s)
    except TimeoutError:
        raise LoadError(f"no answer within {timeout_s:g} s") from None
    if status != 200:
        raise LoadError(f"the server answered {status}")


class LoadError(Exception):
    """The server answered a request with an error."""


@dataclass
class Round:
    """One timed round: the clients start together and send requests for `seconds`."""

    seconds: float
    start: asyncio.Barrier
    done: asyncio.Barrier
    latencies_ms: list[float] = field(default_factory=list)


async def run(args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, *args.shape), dtype=np.uint8)
    raws = [request_bytes(args.protocol, args.model, args.port, i) for i in images]
    # Timing starts when every client has warmed up, and a round ends when all have finished.
    rounds = [
        Round(args.seconds, asyncio.Barrier(args.clients + 1), asyncio.Barrier(args.clients + 1))
        for _ in range(args.repeats)
    ]
    results = []
    # A failing client cancels the others and this body too: no barrier waits forever.
    async with asyncio.TaskGroup() as group:
        for _ in range(args.clients):
            group.create_task(client(args.port, raws, args.warmup, rounds, args.timeout))
        for one in rounds:
            await one.start.wait()
            t0 = time.perf_counter()
            await one.done.wait()
            seconds = time.perf_counter() - t0
            count = len(one.latencies_ms)
            results.append(
                {
                    "latencies_ms": one.latencies_ms,
                    "seconds": seconds,
                    "images_per_s": count / seconds,
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, required=True, help="model server port on 127.0.0.1")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="v2", help="(default: v2)")
    parser.add_argument(
        "--clients", type=positive(int), default=1, help="concurrent clients (default: 1)"
    )
    parser.add_argument(
        "--seconds", type=positive(float), default=2.0, help="per round (default: 2)"
    )
    parser.add_argument(
        "--repeats", type=positive(int), default=1, help="timed rounds (default: 1)"
    )
    parser.add_argument(
        "--warmup", type=positive(float), default=0.5, help="untimed seconds first (default: 0.5)"
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=REPLY_TIMEOUT_S,
        help=f"seconds to wait for an answer before failing (default: {REPLY_TIMEOUT_S})",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[32, 32, 3],
        metavar=("H", "W", "C"),
        help="image shape (default: 32 32 3)",
    )
    args = parser.parse_args(argv)
    try:
        print(json.dumps(uvloop.run(run(args))))
    except* OSError as group:
        raise SystemExit(f"error: {HOST}:{args.port}: {group.exceptions[0]}") from None
    except* LoadError as group:
        raise SystemExit(f"error: {group.exceptions[0]}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
