"""The KServe model server as a process: V1 and V2 answers, 400s for bad input, safe loading."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from safetensors.torch import save as save_safetensors

from components.deploy import png_b64, post_json, serving_command, start_server
from pipelines.config import load_config
from pipelines.processes import free_port, terminate
from serving.model import ImageClassifier
from training.model import build_classifier

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny"
CLASSES = [f"c{i}" for i in range(5)]


def write_model_dir(folder: Path, seed: int = 0) -> Path:
    """A real (untrained) classifier written as training writes one."""
    torch.manual_seed(seed)
    model = build_classifier(len(CLASSES), 3, "s2", [0.5] * 3, [0.25] * 3)
    weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    record = {
        "weights": "model.safetensors",
        "sha256": hashlib.sha256(weights).hexdigest(),
        "classes": CLASSES,
        "num_classes": len(CLASSES),
        "stem": "s2",
        "input": {"shape": [3, 32, 32], "dtype": "uint8", "layout": "NCHW"},
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3, "scale": 255},
    }
    (folder / "model.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    model_dir = write_model_dir(tmp_path_factory.mktemp("model"))
    port = free_port()
    cfg = load_config("smoke", overrides={"serving.max_instances": 8}, environ={})
    proc = start_server(model_dir, NAME, port, cfg, model_dir / "server.log")
    local = ImageClassifier(NAME, model_dir)
    local.load()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    try:
        yield SimpleNamespace(
            base=f"http://127.0.0.1:{port}", proc=proc, local=local, images=images, dir=model_dir
        )
    finally:
        terminate(proc)


def v1(server: SimpleNamespace, instances: object) -> tuple[int, dict]:
    return post_json(f"{server.base}/v1/models/{NAME}:predict", {"instances": instances})


def v2(server: SimpleNamespace, inputs: list[dict]) -> tuple[int, dict]:
    return post_json(f"{server.base}/v2/models/{NAME}/infer", {"inputs": inputs})


def test_v1_images_and_arrays_match_the_in_process_model(server: SimpleNamespace) -> None:
    expected = server.local.classify(server.images)
    code, body = v1(server, [{"image_bytes": {"b64": png_b64(i)}} for i in server.images])
    assert code == 200
    assert [p["index"] for p in body["predictions"]] == expected.argmax(1).tolist()
    first = body["predictions"][0]
    assert first["class"] == CLASSES[first["index"]] and len(first["probabilities"]) == 3
    assert max(first["probabilities"].values()) == pytest.approx(float(expected[0].max()), abs=1e-5)
    code, arrays = v1(server, server.images.tolist())
    assert code == 200 and arrays["predictions"] == body["predictions"]


def test_v2_uint8_and_bytes_inputs(server: SimpleNamespace) -> None:
    expected = server.local.classify(server.images).argmax(1).tolist()
    code, body = v2(
        server,
        [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [4, 32, 32, 3],
                "data": server.images.reshape(-1).tolist(),
            }
        ],
    )
    assert code == 200
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["class_index"]["data"] == expected
    assert outputs["top_k_probability"]["shape"] == [4, 3]
    code, body = v2(
        server,
        [
            {
                "name": "png",
                "datatype": "BYTES",
                "shape": [4],
                "data": [png_b64(i) for i in server.images],
            }
        ],
    )
    assert code == 200
    assert next(o for o in body["outputs"] if o["name"] == "class_index")["data"] == expected


def test_kserve_rest_client_speaks_v2(server: SimpleNamespace) -> None:
    """KServe's own InferenceRESTClient, with binary tensor data."""
    request_input = InferInput("images", [2, 32, 32, 3], "UINT8")
    request_input.set_data_from_numpy(server.images[:2], binary_data=True)
    request = InferRequest(model_name=NAME, infer_inputs=[request_input])

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            return await client.infer(server.base, request, model_name=NAME)
        finally:
            await client._client.aclose()

    response = asyncio.run(call())
    index = response.get_output_by_name("class_index").as_numpy()
    assert index.tolist() == server.local.classify(server.images[:2]).argmax(1).tolist()


BAD_V1 = [
    ([{"image_bytes": {"b64": "@@not base64@@"}}], "invalid base64"),
    ([{"image_bytes": {"b64": base64.b64encode(b"not an image").decode()}}], "not a decodable"),
    ([np.zeros((16, 16, 3), int).tolist()], "shape [16, 16, 3], expected [32, 32, 3]"),
    ([np.full((32, 32, 3), 300).tolist()], "integers in 0..255"),
    ([np.full((32, 32, 3), 0.5).tolist()], "integers in 0..255"),
    ([], "empty batch"),
    ([np.zeros((32, 32, 3), int).tolist()] * 9, "9 instances exceed the maximum of 8"),
    ([{"wrong": 1}], "image_bytes"),
]


@pytest.mark.parametrize(("instances", "message"), BAD_V1)
def test_bad_v1_input_is_a_400_and_the_server_stays_up(server, instances, message) -> None:
    code, body = v1(server, instances)
    assert code == 400, body
    assert message in body["error"]
    with urllib.request.urlopen(f"{server.base}/v2/models/{NAME}/ready", timeout=5) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "use BYTES or UINT8"),
        ([{"name": "x", "datatype": "UINT8", "shape": [2, 32, 32, 3], "data": [1, 2]}], "shape"),
        (
            [{"name": "x", "datatype": "UINT8", "shape": [32, 32, 3], "data": [0] * 3072}],
            "[N,H,W,C]",
        ),
    ],
)
def test_bad_v2_input_is_a_400(server, inputs, message) -> None:
    code, body = v2(server, inputs)
    assert code == 400, body
    assert message in body["error"]


def test_body_without_json_content_type_is_still_read(server: SimpleNamespace) -> None:
    """As `curl -d` sends it: no Content-Type: application/json."""
    body = json.dumps({"instances": server.images[:1].tolist()}).encode()
    request = urllib.request.Request(f"{server.base}/v1/models/{NAME}:predict", body)
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert json.loads(resp.read())["predictions"][0]["class"] in CLASSES
    bad = urllib.request.Request(f"{server.base}/v1/models/{NAME}:predict", b"not json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=30)
    assert err.value.code == 400


def test_server_listens_on_loopback_only(server: SimpleNamespace) -> None:
    listening = [
        c.laddr.ip
        for c in psutil.Process(server.proc.pid).connections("inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and set(listening) == {"127.0.0.1"}


def test_a_taken_port_is_a_config_error(server: SimpleNamespace) -> None:
    from pipelines.errors import ConfigError
    from pipelines.processes import require_free

    port = int(server.base.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"serving.port={port}: the port is in use"):
        require_free(port, "serving.port")


def test_tampered_weights_refuse_to_load(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    weights = bytearray((model_dir / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (model_dir / "model.safetensors").write_bytes(bytes(weights))
    cfg = load_config("smoke", environ={})
    proc = subprocess.run(
        serving_command(model_dir, NAME, free_port(), cfg),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "sha256 mismatch" in proc.stderr and "refusing to load it" in proc.stderr
    assert "Traceback" not in proc.stderr
