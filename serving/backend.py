"""The served forward pass: eager PyTorch, or ONNX Runtime running the same model exported."""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipelines.config import ServingBackend as Backend
from pipelines.errors import PipelineError

log = logging.getLogger("mlops.serving")
# uint8 images, NHWC as they arrive, to float32 logits.
Forward = Callable[[np.ndarray], np.ndarray]
# Served probabilities may differ from PyTorch's by float rounding only; an export that changed
# the computation differs by far more than this.
TOLERANCE = 1e-4


def torch_forward(net: nn.Module) -> Forward:
    def forward(images: np.ndarray) -> np.ndarray:
        # NHWC memory is already the channels_last layout the network runs in: no copy.
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            return net(batch).float().numpy()

    return forward


def onnxruntime_forward(net: nn.Module, example: np.ndarray, threads: int) -> Forward:
    """Export `net` to an ONNX graph in memory and open an ONNX Runtime session on it. The
    weights come from the loaded model, so they are still read only through safetensors."""
    # ONNX Runtime 1.32's telemetry, on by default, writes a device id and an event store to
    # ~/.cache/Microsoft; this variable, read when the runtime starts, turns it off.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime  # only this backend needs it

    graph = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the torch.export-based one,
        # which took 8 s for this network here against 1 s: start-up time matters more.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.from_numpy(example.transpose(0, 3, 1, 2).copy()),),
            graph,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        graph.getvalue(), options, providers=["CPUExecutionProvider"]
    )

    def forward(images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return session.run(None, {"images": batch})[0]

    return forward


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def check_agreement(reference: Forward, served: Forward, probe: np.ndarray, name: str) -> float:
    """The served forward must give PyTorch's probabilities on a probe batch; returns the gap."""
    gap = float(np.abs(softmax(served(probe)) - softmax(reference(probe))).max())
    if not gap <= TOLERANCE:  # also catches NaN
        raise PipelineError(
            f"the {name} backend's probabilities differ from PyTorch's by {gap:.2g} (tolerance "
            f"{TOLERANCE:g}) on a probe batch; serve with serving.backend=torch (--backend torch)"
        )
    return gap


def build_forward(
    net: nn.Module, backend: Backend, threads: int, shape: tuple[int, ...]
) -> Forward:
    """The forward pass of `backend` for the loaded, eval-mode `net`; images are `shape` (HWC)."""
    reference = torch_forward(net)
    if backend == "torch":
        return reference
    if backend != "onnxruntime":
        raise PipelineError(f"backend {backend!r}: choose onnxruntime or torch")
    start = time.monotonic()
    probe = np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8)
    try:
        served = onnxruntime_forward(net, probe, threads)
    # Broad on purpose: a missing package (ImportError), the exporter (OnnxExporterError, a
    # RuntimeError) and ONNX Runtime (its own Exception subclasses) fail in different types, and
    # each means the same to the user: this backend cannot start here.
    except Exception as exc:
        raise PipelineError(
            f"the {backend} backend could not start ({type(exc).__name__}: {exc}); "
            "serve with serving.backend=torch (--backend torch)"
        ) from None
    gap = check_agreement(reference, served, probe, backend)
    log.info(
        "%s backend ready in %.1f s; its probabilities are within %.1g of PyTorch's",
        backend,
        time.monotonic() - start,
        gap,
    )
    return served
