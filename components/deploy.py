"""Step deploy: serve the model locally and smoke-test it, or apply its InferenceService."""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import warm
from pipelines.cli import s3_uri_arg, step_main
from pipelines.config import PipelineConfig
from pipelines.errors import PipelineError
from pipelines.processes import (
    HOST,
    require_free,
    serve_until_stopped,
    server_log,
    terminate,
    wait_http_ok,
)
from pipelines.storage import ObjectStore
from serving.launch import MODEL_JSON, download_model, local_model_dir, serving_args

# No torch at import time: deploy starts the model server first, then imports torch for the
# in-process reference answers while the server imports its own (about 4 s each here).
log = logging.getLogger("mlops.deploy")
ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
SMOKE_IMAGES = 16


@dataclass
class DeployResult:
    model_dir: str
    endpoint_v1: str
    endpoint_v2: str
    smoke_images: int
    smoke_agreement: float
    serving: bool
    pid: int | None = field(default=None, compare=False)


def post_json(url: str, body: dict, timeout_s: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, "png")
    return base64.b64encode(buf.getvalue()).decode()


def serving_command(model_dir: Path, name: str, port: int, cfg: PipelineConfig) -> list[str]:
    """`python -m serving` for model_dir, on 127.0.0.1:port, with the config's settings."""
    args = serving_args(str(model_dir), name, port, HOST, cfg.serving)
    return [sys.executable, "-m", "serving", *args]


def launch_server(
    model_dir: Path,
    name: str,
    port: int,
    cfg: PipelineConfig,
    log_path: Path,
    outlive: bool = False,
) -> warm.Process:
    """Start the model server and return at once; wait_ready says when it serves. It is
    forked from the run's fork server where there is one, unless it is to `outlive` this step
    (--serve): then it is a process of its own, `python -m serving`."""
    command = serving_command(model_dir, name, port, cfg)
    with open(log_path, "ab") as out, open(os.devnull, "rb") as null:
        fds = (null.fileno(), out.fileno(), out.fileno())
        return warm.start(command[1:], dict(os.environ), ROOT, fds, fork=not outlive)


def wait_ready(proc: warm.Process, name: str, port: int, log_path: Path) -> None:
    """Return once the model reports ready; fail if the server exits or never gets there."""
    wait_http_ok(
        f"http://{HOST}:{port}/v2/models/{name}/ready",
        READY_TIMEOUT_S,
        proc,
        "the model server",
        f"see {log_path}",
    )


def start_server(
    model_dir: Path, name: str, port: int, cfg: PipelineConfig, log_path: Path
) -> warm.Process:
    """Start the model server; return once the model reports ready, or stop it and fail."""
    proc = launch_server(model_dir, name, port, cfg, log_path)
    try:
        wait_ready(proc, name, port, log_path)
    except BaseException:
        terminate(proc)
        raise
    return proc


def reference_answers(
    model_dir: Path, processed_uri: str, store: ObjectStore
) -> tuple[np.ndarray, list[int]]:
    """The first test images, NHWC, and the classes eager PyTorch gives them in-process: the
    model as verify-model gated it, whatever backend (serving.backend) the server runs."""
    # The served forward pass itself, without the KServe model around it: importing kserve
    # here took about 2 s of the two cores while the server starts and imports its own.
    import torch

    from serving.backend import torch_forward
    from serving.loader import load_model
    from training.data import load_processed

    torch.set_num_threads(1)  # the other core is the starting server's
    _, splits = load_processed(store, processed_uri, only=("test",))
    images = splits["test"].images[:SMOKE_IMAGES].permute(0, 2, 3, 1).numpy()
    net, _ = load_model(model_dir)
    return images, torch_forward(net)(images).argmax(1).tolist()


def smoke_test(base: str, name: str, images: np.ndarray, expected: list[int]) -> float:
    """Served V1 and V2 answers must equal the in-process model's on real test images."""
    code, v1 = post_json(
        f"{base}/v1/models/{name}:predict",
        {"instances": [{"image_bytes": {"b64": png_b64(i)}} for i in images]},
    )
    if code != 200:
        raise PipelineError(f"V1 predict answered {code}: {v1}")
    served_v1 = [p["index"] for p in v1["predictions"]]
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "data": images.reshape(-1).tolist(),
            }
        ]
    }
    code, v2 = post_json(f"{base}/v2/models/{name}/infer", body)
    if code != 200:
        raise PipelineError(f"V2 infer answered {code}: {v2}")
    served_v2 = next(o["data"] for o in v2["outputs"] if o["name"] == "class_index")
    agree = np.mean([a == b == c for a, b, c in zip(expected, served_v1, served_v2, strict=True)])
    if agree < 1.0:
        raise PipelineError(
            f"served predictions differ from the model's on {1 - agree:.0%} of the test images"
        )
    return float(agree)


def deploy(
    cfg: PipelineConfig, store: ObjectStore, model_uri: str, serve: bool = False
) -> DeployResult:
    """Fetch into the state dir's model dir, serve, smoke-test; stop unless `serve`.

    With runtime=kubernetes, apply the InferenceService instead (components/inferenceservice)."""
    if cfg.runtime == "kubernetes":
        from components.inferenceservice import apply_inference_service

        return apply_inference_service(cfg, model_uri)
    name = cfg.model_name
    model_dir = local_model_dir(cfg)
    shutil.rmtree(model_dir, ignore_errors=True)
    download_model(store, model_uri, model_dir)
    meta = json.loads((model_dir / MODEL_JSON).read_text())
    port = cfg.serving.port
    require_free(port, "serving.port")
    log_path = server_log(model_dir)
    proc = launch_server(model_dir, name, port, cfg, log_path, outlive=serve)
    base = f"http://{HOST}:{port}"
    try:
        images, expected = reference_answers(model_dir, meta["lineage"]["processed_uri"], store)
        wait_ready(proc, name, port, log_path)
        agreement = smoke_test(base, name, images, expected)
    except BaseException:
        terminate(proc)
        raise
    log.info(
        "model server (%s) on %s: %d test images answered as PyTorch does in-process",
        cfg.serving.backend,
        base,
        len(images),
    )
    if not serve:
        terminate(proc)
    return DeployResult(
        model_dir=str(model_dir),
        endpoint_v1=f"{base}/v1/models/{name}:predict",
        endpoint_v2=f"{base}/v2/models/{name}/infer",
        smoke_images=len(images),
        smoke_agreement=agreement,
        serving=serve,
        pid=proc.pid if serve else None,
    )


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-uri",
        required=True,
        type=s3_uri_arg,
        metavar="URI",
        help="the verified model, s3://models/NAME/RUN/",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep the server running until Ctrl-C (default: stop after the test)",
    )


def main(argv: list[str] | None = None) -> int:
    def step(cfg: PipelineConfig, store: ObjectStore, args: argparse.Namespace) -> DeployResult:
        result = deploy(cfg, store, args.model_uri, args.serve)
        if args.serve:
            print(f"serving {result.endpoint_v1} (Ctrl-C to stop)", file=sys.stderr)
            assert result.pid is not None  # a served result has one
            serve_until_stopped(result.pid, Path(result.model_dir))
        return result

    return step_main(step, "components.deploy", __doc__, ["--port", "--state-dir"], argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
