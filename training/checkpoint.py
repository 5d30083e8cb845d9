"""Checkpoints in S3: tensors as safetensors, state as JSON, then a `latest.json` pointer."""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipelines.errors import PipelineError
from pipelines.storage import ObjectStore
from training.resume import LATEST, malformed, read_pointer

log = logging.getLogger("mlops.train")
EPOCH = "epoch-"  # each checkpoint's objects: epoch-NNNN.safetensors and epoch-NNNN.json


@dataclass
class Checkpoint:
    epoch: int  # epochs completed
    tensors: dict[str, torch.Tensor]  # model.*, optim.* and rng.* entries
    state: dict[str, Any]  # JSON: optimizer/scheduler scalars, history, config hash


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = float(value)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], state: dict) -> dict[str, Any]:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            slots.setdefault(int(pid), {})[name] = value
    for key, value in state["scalars"].items():
        pid, name = key.split(".", 1)
        slots.setdefault(int(pid), {})[name] = torch.tensor(value)
    return {"state": slots, "param_groups": state["param_groups"]}


def encode(ckpt: Checkpoint) -> tuple[dict[str, Any], bytes, bytes]:
    """The pointer and the two objects' bytes: a snapshot, whatever the tensors do next."""
    name = f"{EPOCH}{ckpt.epoch:04d}"
    payload = save_safetensors({k: v.contiguous() for k, v in ckpt.tensors.items()})
    state = json.dumps({**ckpt.state, "epoch": ckpt.epoch}, sort_keys=True).encode()
    pointer = {
        "epoch": ckpt.epoch,
        "tensors": {"key": f"{name}.safetensors", "sha256": hashlib.sha256(payload).hexdigest()},
        "state": {"key": f"{name}.json", "sha256": hashlib.sha256(state).hexdigest()},
    }
    return pointer, payload, state


def upload(
    store: ObjectStore, bucket: str, prefix: str, encoded: tuple[dict[str, Any], bytes, bytes]
) -> None:
    """Write the epoch's two objects, then the pointer: a reader sees the old or the new, whole.
    Then remove the epochs before the previous one: only a pointer's are ever read, and each
    of the others (89 MB for ResNet-18 with its momentum) stayed in the store for good. The
    previous one stays, for a reader that read its pointer just before this one, and any
    later one, for an attempt of the same run still writing."""
    pointer, payload, state = encoded
    store.put_bytes(bucket, prefix + pointer["tensors"]["key"], payload)
    store.put_bytes(bucket, prefix + pointer["state"]["key"], state, "application/json")
    store.write_json(bucket, prefix + LATEST, pointer)
    epochs: dict[int, list[str]] = {}
    for obj in store.list(bucket, prefix + EPOCH):
        number = obj.key[len(prefix + EPOCH) :].split(".", 1)[0]
        if number.isdigit():
            epochs.setdefault(int(number), []).append(obj.key)
    for epoch in sorted(e for e in epochs if e < pointer["epoch"])[:-1]:
        for key in epochs[epoch]:
            store.remove(bucket, key)


def release_tensors(store: ObjectStore, bucket: str, prefix: str) -> int:
    """Once the run's model is complete, remove its checkpoints' tensors (89 MB an epoch for
    ResNet-18 with its momentum, two epochs kept): no resume reads them any more, and KServe's
    storage initializer copies the whole model folder into each predictor pod. The pointer and
    the state objects stay, so a resume of the run is still checked against its config.
    Returns the bytes removed; a store that refuses is logged, not raised (the model is done)."""
    freed = 0
    try:
        for obj in store.list(bucket, prefix + EPOCH):
            if obj.key.endswith(".safetensors"):
                store.remove(bucket, obj.key)
                freed += obj.size or 0
    except PipelineError as exc:
        log.warning("the checkpoints' tensors stay in the store (%s)", exc)
    return freed


class Saver:
    """Checkpoints uploaded while the next epoch trains, one at a time, in order.

    The upload was about 80% of a checkpoint's cost (about 0.9 s an epoch here). The tensors
    are encoded to bytes first, on the caller's thread, because training changes them in place.
    An upload that fails is raised by the next save() or by wait(); one cut short by the
    process's end leaves the previous checkpoint current, as the pointer is written last."""

    def __init__(self, store: ObjectStore, bucket: str, prefix: str):
        self.store, self.bucket, self.prefix = store, bucket, prefix
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: Future[None] | None = None

    def save(self, ckpt: Checkpoint) -> None:
        encoded = encode(ckpt)
        self.wait()
        self.pending = self.pool.submit(upload, self.store, self.bucket, self.prefix, encoded)
        _IN_FLIGHT.add(self.pending)
        self.pending.add_done_callback(_IN_FLIGHT.discard)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


# Uploads in flight, held here rather than through their Saver: a stop's exception unwinds
# the trainer's frames, and the Saver goes with them before settle_uploads runs (a weak set
# of Savers was empty by then, and the upload was cut off).
_IN_FLIGHT: set[Future[None]] = set()


def settle_uploads(timeout_s: float = 30.0) -> None:
    """At a trainer's end, however it ends: a stop just after an epoch (a SIGTERM) ended the
    process while that epoch's checkpoint was on its way, under a second here. MLflow had its
    metrics, the store the checkpoint before, and a resume trained the epoch again. Waits for
    at most timeout_s; a failed upload is logged."""
    for pending in list(_IN_FLIGHT):
        done, _ = futures.wait([pending], timeout=timeout_s)
        error = pending.exception() if done else TimeoutError(f"not done in {timeout_s:.0f} s")
        if error is not None:
            log.warning("the last checkpoint was not uploaded (%s): a resume starts before", error)


def load_latest(store: ObjectStore, bucket: str, prefix: str) -> Checkpoint | None:
    found = read_pointer(store, bucket, prefix)
    if found is None:
        return None
    pointer, state = found
    try:
        key, sha256 = pointer["tensors"]["key"], pointer["tensors"]["sha256"]
        payload = store.get_bytes(bucket, prefix + key, sha256)
    except (KeyError, TypeError) as exc:
        raise malformed(bucket, prefix, exc) from None
    return Checkpoint(pointer["epoch"], load_safetensors(payload), state)
