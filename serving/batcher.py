"""Micro-batching: concurrent requests share one forward pass, and each gets back its own rows."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from kserve.errors import InferenceError
from prometheus_client import Counter, Histogram

log = logging.getLogger("mlops.serving")

Rows = tuple[np.ndarray, ...]  # a forward's outputs, one row per image along axis 0
# Served on KServe's /metrics beside its own latency histograms: what batching achieves.
BATCH_IMAGES = Histogram(
    "forward_batch_images",
    "Images per forward pass of the micro-batcher",
    ["model_name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

# The server logs a sample of its 503s (serving/rest.py); this counts every one.
REQUESTS_SHED = Counter(
    "requests_shed", "Requests refused with a 503 because too many images wait", ["model_name"]
)


class Overloaded(RuntimeError):
    """More images wait for a forward pass than the server takes: answered with a 503."""


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future[Rows]
    arrived: float


class MicroBatcher:
    """Queue requests on the event loop; one worker runs them through `infer` in batches.

    The worker takes whatever is queued the moment it is free, so a lone request runs at once
    and requests that arrive during a forward pass form the next batch. Only when the last batch
    held several requests (concurrent load) does a batch wait up to `wait_ms` for more.
    Requests are never split: a batch closes before a request that would overflow `max_batch`,
    and a request larger than `max_batch` runs alone. With 16 closed-loop clients on 2 cores,
    a 5 ms window made batches of 15 instead of 8 but no more images/s (the forward thread
    idled while the event loop, the bottleneck, caught up), hence the default of 0.
    """

    def __init__(
        self,
        name: str,
        infer: Callable[[np.ndarray], Rows],
        max_batch: int,
        wait_ms: float = 0.0,
        max_queued: int = 1024,
    ):
        self.infer = infer
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.wait_s = wait_ms / 1000
        # One thread: the forward passes run one after another, off the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._sizes = BATCH_IMAGES.labels(model_name=name)
        self._shed = REQUESTS_SHED.labels(model_name=name)
        self._queued = self._decoding = 0

    def _admit(self, count: int) -> None:
        waiting = self._queued + self._decoding
        if waiting and waiting + count > self.max_queued:
            # Past this the wait only grows: a client told now can retry elsewhere or later.
            self._shed.inc()
            raise Overloaded(
                f"{waiting} images already wait for the model "
                f"(serving.max_queued_images={self.max_queued}): retry later, or add replicas"
            )

    @contextmanager
    def decoding(self, count: int) -> Iterator[None]:
        """A request's `count` images, waiting to be decoded, are counted as waiting for the
        model: requests queued for the one decoding thread held their bodies in memory and
        waited as long, uncounted (40 clients of 8 large PNGs each waited up to 27 s, and no
        request got a 503)."""
        self._admit(count)
        self._decoding += count
        try:
            yield
        finally:
            self._decoding -= count

    async def submit(self, images: np.ndarray) -> Rows:
        """The outputs of `infer` for exactly these (already validated) images."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._start(loop)
        self._admit(len(images))
        future: asyncio.Future[Rows] = loop.create_future()
        self._pending.append(_Item(images, future, loop.time()))
        self._queued += len(images)
        self._wake.set()
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            # A queue per event loop: tests and clients may run several, one after another.
            self._loop = loop
            self._pending: deque[_Item] = deque()
            self._queued = 0
            self._wake = asyncio.Event()
        self._worker = loop.create_task(self._run(), name="micro-batcher")

    async def _run(self) -> None:
        concurrent = False
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if concurrent and self.wait_s > 0:
                await self._fill()
            batch = self._take()
            if batch:
                concurrent = len(batch) > 1
                await self._forward(batch)

    async def _fill(self) -> None:
        """Wait until max_batch images are queued or wait_ms has passed since the first one."""
        deadline = self._pending[0].arrived + self.wait_s
        while self._queued < self.max_batch:
            left = deadline - self._loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._pending:
            n = len(self._pending[0].images)
            if batch and size + n > self.max_batch:
                break
            item = self._pending.popleft()
            self._queued -= n
            if not item.future.done():  # done: its client has gone (cancelled)
                batch.append(item)
                size += n
        return batch

    async def _forward(self, batch: list[_Item]) -> None:
        try:
            images = np.concatenate([item.images for item in batch])
            outputs = await self._loop.run_in_executor(self._executor, self.infer, images)
        except Exception as exc:
            # Only this batch fails (a 500 each); the worker and the server carry on.
            log.exception("forward pass over %d requests failed", len(batch))
            message = f"inference failed: {type(exc).__name__}: {exc}"
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceError(message))
            return
        self._sizes.observe(len(images))
        start = 0
        for item in batch:
            stop = start + len(item.images)
            if not item.future.done():
                item.future.set_result(tuple(out[start:stop] for out in outputs))
            start = stop
