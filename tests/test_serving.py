"""The KServe model server as a process: V1 and V2 answers, 400s for bad input, safe loading."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import pytest
import requests
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER as INFERENCE_HEADER
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import RequestedOutput
from PIL import ExifTags, Image

from components.deploy import png_b64, post_json, serving_command, start_server
from data.imagefolder import fit_image
from pipelines.config import ServingConfig, load_config
from pipelines.errors import ConfigError, DataError, PipelineError
from pipelines.processes import free_port, terminate
from pipelines.storage import ObjectStore
from serving.batcher import MicroBatcher
from serving.launch import download_model
from serving.loader import load_model
from serving.model import ImageClassifier
from serving.untrained import write_untrained_model

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny"
CLASSES = [f"c{i}" for i in range(5)]


def write_model_dir(folder: Path, seed: int = 0) -> Path:
    """A real (untrained) classifier written as training writes one."""
    return write_untrained_model(folder, CLASSES, "s2", seed=seed)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    model_dir = write_model_dir(tmp_path_factory.mktemp("model"))
    port = free_port()
    overrides = {"serving.max_instances": 8, "serving.max_body_mb": 1}
    cfg = load_config("smoke", overrides=overrides, environ={})
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


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def b64_instances(data: bytes) -> dict:
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(data).decode()}}]}


def test_a_photo_of_another_size_is_resized_as_training_resizes(
    server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PNG or JPEG of any size classifies (the model takes 32x32), scaled by the function
    that resizes imagefolder images for training; before, any other size was a 400."""
    rng = np.random.default_rng(1)
    photos = {
        "JPEG": encoded(rng.integers(0, 256, (480, 640, 3), np.uint8), "JPEG"),
        "PNG": encoded(rng.integers(0, 256, (50, 100, 3), np.uint8), "PNG"),
    }
    for data in photos.values():
        with Image.open(io.BytesIO(data)) as opened:
            want = np.array(fit_image(opened, "RGB", (32, 32)))[None]
        assert np.array_equal(server.local.parse(b64_instances(data))[1], want)
        code, body = post_json(f"{server.base}/v1/models/{NAME}:predict", b64_instances(data))
        assert code == 200, body
        expected = server.local.classify(want)[0]
        assert body["predictions"][0]["index"] == int(expected.argmax())
        top = max(body["predictions"][0]["probabilities"].values())
        assert top == pytest.approx(float(expected.max()), abs=1e-5)
    # The cap counts the pixels decoded: the JPEG's 640x480 decodes at 1/8, 80x60.
    monkeypatch.setattr(server.local, "max_decode_pixels", 80 * 60)
    server.local.parse(b64_instances(photos["JPEG"]))
    big = encoded(rng.integers(0, 256, (60, 81, 3), np.uint8), "PNG")
    with pytest.raises(InvalidInput, match="image is 81x60, more than the 4800 pixels"):
        server.local.parse(b64_instances(big))


# In-process, pytest sets aside the module's own filter of Pillow's EXIF warnings (see below).
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_photo_is_classified_upright_as_its_exif_orientation_says(
    server: SimpleNamespace,
) -> None:
    """A phone stores a photo as its sensor read it and tags how to turn it: the server and
    training (the same fit_image) see it as a viewer shows it, not on its side. EXIF that
    does not parse is ignored, as viewers ignore it."""
    upright = server.images[0]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # turn 90 degrees clockwise to view
    stored = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(stored, "PNG", exif=exif)
    with Image.open(io.BytesIO(stored.getvalue())) as opened:  # training's reading, any size
        assert np.array_equal(np.array(fit_image(opened, "RGB", None)), upright)
    assert np.array_equal(server.local.parse(b64_instances(stored.getvalue()))[1][0], upright)
    code, body = post_json(
        f"{server.base}/v1/models/{NAME}:predict", b64_instances(stored.getvalue())
    )
    assert code == 200, body
    assert body["predictions"][0]["index"] == int(server.local.classify(upright[None])[0].argmax())

    garbled = io.BytesIO()
    Image.fromarray(upright).save(
        garbled, "PNG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"
    )
    assert np.array_equal(server.local.parse(b64_instances(garbled.getvalue()))[1][0], upright)
    # Nor is Pillow's "Corrupt EXIF data" warning logged, in a process of its own: pytest's
    # own warning capture would set aside the filter data.imagefolder installs.
    code = (
        "import sys; from PIL import Image; from data.imagefolder import fit_image\n"
        "fit_image(Image.open(sys.stdin.buffer), 'RGB', None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        input=garbled.getvalue(),
        capture_output=True,
        check=True,
    )
    assert out.stderr == b""


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
    expected = server.local.classify(server.images[:2])
    index = response.get_output_by_name("class_index").as_numpy()
    assert index.tolist() == expected.argmax(1).tolist()

    # The outputs it asks for, and only those, in the encoding each asks for (they were all
    # sent, as JSON, whatever the request said).
    request.request_outputs = [
        RequestedOutput("top_k_probability", {"binary_data": True}),
        RequestedOutput("class_name"),
    ]
    response = asyncio.run(call())
    assert [o.name for o in response.outputs] == ["top_k_probability", "class_name"]
    top = response.outputs[0].as_numpy()
    assert top.shape == (2, 3)
    assert top[:, 0] == pytest.approx(expected.max(1).values.numpy(), abs=1e-5)
    names = response.outputs[1].as_numpy().tolist()
    assert names == [CLASSES[i] for i in expected.argmax(1).tolist()], names


def test_a_v2_request_gets_the_outputs_it_names(server: SimpleNamespace) -> None:
    """A V2 request that names its outputs gets those; binary_data_output asks for all of them
    in binary, and an output of no such name is a 400 that lists the model's."""
    tensor = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3]}
    body = {"inputs": [{**tensor, "data": server.images[0].ravel().tolist()}]}
    url = f"{server.base}/v2/models/{NAME}/infer"
    code, out = post_json(url, {**body, "outputs": [{"name": "class_index"}]})
    assert code == 200, out
    want = int(server.local.classify(server.images[:1]).argmax())
    assert [(o["name"], o["data"]) for o in out["outputs"]] == [("class_index", [want])]

    binary = requests.post(
        url, json={**body, "parameters": {"binary_data_output": True}}, timeout=30
    )
    assert binary.status_code == 200, binary.text
    size = int(binary.headers["inference-header-content-length"])
    header = json.loads(binary.content[:size])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]][::2] == [8, 24]
    assert np.frombuffer(binary.content[size : size + 8], np.int64).tolist() == [want]

    code, out = post_json(url, {**body, "outputs": [{"name": "class_index"}, {"name": "logits"}]})
    assert (
        code == 400 and "output 'logits' is not one of this model's: class_index, " in out["error"]
    )
    # A flag of JSON's "false" is no boolean (Python reads the string as true): a 400.
    code, out = post_json(url, {**body, "parameters": {"binary_data_output": "false"}})
    assert code == 400 and out["error"] == (
        "parameters: binary_data_output must be true or false, got 'false'"
    )
    wanted = [{"name": "class_index", "parameters": {"binary_data": "no"}}]
    code, out = post_json(url, {**body, "outputs": wanted})
    assert code == 400 and "output class_index: binary_data must be true or false" in out["error"]


def test_v2_metadata_describes_the_request_and_the_response(server: SimpleNamespace) -> None:
    """A V2 client builds its request from GET /v2/models/NAME: that request is answered, with
    the outputs the metadata names, in their datatypes and shapes."""
    meta = requests.get(f"{server.base}/v2/models/{NAME}", timeout=30).json()
    (spec,) = meta["inputs"]
    assert spec == {"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}
    batch = server.images[:2]
    tensor = {**spec, "shape": [len(batch), *spec["shape"][1:]], "data": batch.ravel().tolist()}
    code, body = v2(server, [tensor])
    assert code == 200, body
    got = [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]]
    want = [(o["name"], o["datatype"], [len(batch), *o["shape"][1:]]) for o in meta["outputs"]]
    assert got == want and want[2][2] == [2, 3]  # top_k 3 of the 5 classes


def v2_binary(server: SimpleNamespace, element: bytes) -> requests.Response:
    """One BYTES element with the binary data extension, as a client library sends it."""
    blob = struct.pack("<I", len(element)) + element
    tensor = {"name": "images", "datatype": "BYTES", "shape": [1]}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]})
    return requests.post(
        f"{server.base}/v2/models/{NAME}/infer",
        data=header.encode() + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )


def test_a_clients_error_is_bounded_and_cannot_write_log_lines(server: SimpleNamespace) -> None:
    """An error message that quotes the request is cut short, in the answer and the log (a
    5 MB field came back whole, and went into the log whole), and a client's text cannot
    start a line of the log (an input name with a newline wrote a forged ERROR line)."""
    log_path = server.dir / "server.log"
    before = log_path.stat().st_size
    code, body = v2(
        server, [{"name": "x", "datatype": "BYTES", "shape": [1], "data": "A" * 500_000}]
    )
    assert code == 400 and len(body["error"]) < 1100, len(body["error"])
    assert body["error"].endswith(" characters)") and body["error"].startswith("inputs[0].data")
    forged = "x\nERROR:kserve:Exception: forged"
    code, body = v2(server, [{"name": forged, "datatype": "FP32", "shape": [1], "data": [1]}])
    assert code == 400 and forged in body["error"]  # the answer says what was sent
    added = log_path.read_bytes()[before:].decode()
    assert len(added) < 4000, len(added)
    assert not any(line.startswith("ERROR:kserve:Exception: forged") for line in added.splitlines())
    assert "x\\nERROR:kserve:Exception: forged" in added  # escaped, on the warning's line


def test_fastapis_own_refusals_answer_in_the_servers_error_format(server: SimpleNamespace) -> None:
    """No such route, a wrong method, a body FastAPI cannot parse: {"error": ...} as every
    other error, not FastAPI's {"detail": ...}; a 405 still says which method to use."""
    missing = requests.get(f"{server.base}/v2/nothing", timeout=10)
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    url = f"{server.base}/v2/models/{NAME}/infer"
    wrong = requests.delete(url, timeout=10)
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}
    assert wrong.headers["allow"] == "POST"
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    packed = requests.post(url, data=gzip.compress(b'{"inputs": []}'), headers=headers, timeout=10)
    assert packed.status_code == 400 and packed.json() == {
        "error": "There was an error parsing the body: send it as JSON, uncompressed"
    }


def test_requests_are_decoded_off_the_event_loop(server: SimpleNamespace) -> None:
    """Decoding ran on the event loop: a request of 64 photos of 4 M pixels held up every
    other request, health checks included, for seconds. It runs on the parse thread."""
    model = ImageClassifier(NAME, server.dir)
    model.load()
    seen: list[str] = []
    parse = model.parse

    def spied(payload: Any) -> Any:  # the real parse, noting the thread it runs on
        seen.append(threading.current_thread().name)
        return parse(payload)

    model.parse = spied  # type: ignore[method-assign]

    async def call() -> tuple[Any, str]:
        out = await model.predict(
            {"instances": [{"image_bytes": {"b64": png_b64(server.images[0])}}]}
        )
        return out, threading.current_thread().name

    out, loop_thread = asyncio.run(call())
    assert out["predictions"][0]["index"] == int(server.local.classify(server.images[:1]).argmax())
    assert len(seen) == 1 and seen[0] != loop_thread and seen[0].startswith("parse")


def test_v2_binary_bytes_take_an_images_own_bytes_or_base64(server: SimpleNamespace) -> None:
    """The extension sends a BYTES element as its length and its bytes: KServe's own client
    sends an image so. KServe 0.21 decoded them as UTF-8 and refused every image (a 400 that
    asked for base64 text, which is also still taken)."""
    from kserve import InferInput, InferRequest

    expected = server.local.classify(server.images[:2]).argmax(1).tolist()
    pngs = [base64.b64decode(png_b64(image)) for image in server.images[:2]]
    for elements in (pngs, [base64.b64encode(png) for png in pngs]):
        tensor = InferInput("images", [2], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=True)
        body, length = InferRequest(NAME, [tensor], request_id="r-1").to_rest()
        answer = requests.post(
            f"{server.base}/v2/models/{NAME}/infer",
            data=body,
            headers={"Inference-Header-Content-Length": str(length)},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        out = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert out["class_index"] == expected and answer.json()["id"] == "r-1"
    one = v2_binary(server, pngs[0])
    assert one.status_code == 200, one.text
    # An id given is returned, the empty one too (it was replaced by a new one).
    tensor = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [1],
        "data": [png_b64(server.images[0])],
    }
    code, body = post_json(f"{server.base}/v2/models/{NAME}/infer", {"id": "", "inputs": [tensor]})
    assert (code, body["id"]) == (200, "")
    assert requests.get(f"{server.base}/v2/health/ready", timeout=10).status_code == 200


def test_v2_binary_bodies_that_do_not_match_their_header_are_400s(
    server: SimpleNamespace,
) -> None:
    """A binary-extension body's JSON header is checked as a JSON body is, and its sizes
    against the bytes that follow. KServe read the header unchecked (a field of the wrong
    type was a 500 and two tracebacks in the log) and served a body shorter or longer than it
    declared as though whole."""
    url = f"{server.base}/v2/models/{NAME}/infer"

    def post(doc: dict | str, blob: bytes = b"", length: str | None = None) -> requests.Response:
        header = doc if isinstance(doc, str) else json.dumps(doc)
        length = str(len(header)) if length is None else length
        headers = {"Inference-Header-Content-Length": length}
        return requests.post(url, data=header.encode() + blob, headers=headers, timeout=30)

    uint8 = {"name": "x", "datatype": "UINT8", "shape": [1, 32, 32, 3]}
    image = server.images[:1].tobytes()
    sized = {**uint8, "parameters": {"binary_data_size": len(image)}}
    png = base64.b64decode(png_b64(server.images[0]))
    raw_bytes = {"name": "x", "datatype": "BYTES", "shape": [1]}
    bytes_input = {**raw_bytes, "data": [png_b64(server.images[0])]}
    cases = [
        (post({"inputs": [sized]}, image[:100]), "the header declares 3072 bytes of tensor data"),
        (post({"inputs": [sized]}, image + bytes(100)), "the header declares 3072 bytes"),
        (post({"inputs": [sized]}, image, length="abc"), "a binary body needs inference-header"),
        (post({"inputs": [sized]}, image, length="99999"), "a binary body needs inference-header"),
        (post("{not json", image, length="9"), "the first 9 bytes of the body"),
        (post({"inputs": [1]}), "inputs[0]: Input should be a valid dictionary"),
        (post({"inputs": [{**uint8, "shape": None}]}), "inputs[0].shape: Input should be a valid"),
        (post({"inputs": [{**sized, "shape": [-1, 32, 32, 3]}]}, image), "inputs[0].shape[0]: "),
        (post({"id": 7, "inputs": [bytes_input]}), "id: Input should be a valid string"),
        (post({"parameters": "x", "inputs": [bytes_input]}), "parameters: Input should be a"),
        (post({"inputs": [uint8]}), "inputs[0]: no data, and no binary_data_size"),
        # BYTES without the 4-byte length prefix: the PNG signature read as a length.
        (
            post({"inputs": [{**raw_bytes, "parameters": {"binary_data_size": len(png)}}]}, png),
            "inputs[0]: a BYTES element of 1196314761 bytes is cut short",
        ),
        (
            post({"inputs": [{**raw_bytes, "parameters": {"binary_data_size": 2}}]}, b"ab"),
            "inputs[0]: a BYTES element's 4-byte length is cut short",
        ),
        (
            post(
                {"inputs": [{**raw_bytes, "shape": [2], "parameters": {"binary_data_size": 9}}]},
                struct.pack("<I", 5) + b"AAAAA",
            ),
            "inputs[0]: 1 BYTES elements for shape [2]",
        ),
        (
            post(
                {"inputs": [{**raw_bytes, "shape": [1], "parameters": {"binary_data_size": 12}}]},
                struct.pack("<I", 4) + b"AAAA" + struct.pack("<I", 0),
            ),
            "inputs[0]: more than 1 BYTES elements for shape [1]",
        ),
        # Counted before a single element is split: 10 M of them held the event loop 19 s.
        (
            post(
                {"inputs": [{**raw_bytes, "shape": [100], "parameters": {"binary_data_size": 2}}]},
                b"ab",
            ),
            "100 instances exceed the maximum of 8",
        ),
        # Named as in a JSON body, not KServe's "invalid datatype None in the input".
        (
            post({"inputs": [{**sized, "datatype": "BF16"}]}, image),
            "input x: datatype BF16; use BYTES or UINT8",
        ),
        (post({"inputs": [{**sized, "shape": [1, 16, 64, 3]}]}, image), "x[0]: shape [16, 64, 3]"),
    ]
    for answer, message in cases:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"].startswith(message), (message, answer.text)
    # The whole body as the header when the length header is missing: JSON that curl -d
    # sent as a form, which V1 reads as JSON too.
    answer = post({"inputs": [bytes_input]}, length="")
    assert answer.status_code == 400 and "needs inference-header" in answer.text
    plain = requests.post(url, data=json.dumps({"inputs": [bytes_input]}), timeout=30)
    assert plain.status_code == 200, plain.text
    assert requests.get(f"{server.base}/v2/health/ready", timeout=10).status_code == 200


def test_a_binary_uint8_tensor_is_read_as_an_array() -> None:
    """KServe made it a Python list one element at a time, on the event loop: 9 s for 12 MB,
    when the server answered nothing else, its health checks included."""
    from serving.rest import binary_request

    pixels = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).tobytes()
    # Lower case, as KServe's InferInput takes it too.
    tensor = {"name": "x", "datatype": "uint8", "shape": [2, 32, 32, 3]}
    header = json.dumps(
        {"id": "r", "inputs": [{**tensor, "parameters": {"binary_data_size": 6144}}]}
    )
    body = header.encode() + pixels
    counted: list[int] = []
    request = binary_request(
        body, {"inference-header-content-length": str(len(header))}, NAME, counted.append
    )
    data = request.inputs[0].data
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8
    assert data.tobytes() == pixels and request.id == "r" and request.inputs[0].parameters == {}
    assert counted == []  # a UINT8 tensor's count is the model's to check, from its shape
    # Waiting to be decoded, it counts as its shape says; JSON sent without its content type,
    # not parsed yet, as the most a request may hold.
    from serving.model import ImageClassifier

    model = ImageClassifier(NAME, Path("unused"), ServingConfig(max_instances=8))
    assert model.images_in(request) == 2
    assert model.images_in({"instances": [[0]] * 3}) == 3 and model.images_in(b"{}") == 8


def png_header(width: int, height: int) -> str:
    """base64 of a 1-bit PNG that declares width x height over one row of pixel data: it fails
    to decode, so an answer that names its size shows the size was checked before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = zlib.compress(bytes(width // 8 + 2))
    png = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + png).decode()


def png16_b64() -> str:
    """A 32x32 16-bit grayscale PNG (mode I;16), which training refuses too."""
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32), 40_000, np.uint16)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def uint8_input(value: object, shape: tuple[int, ...] = (1, 32, 32, 3)) -> list[dict]:
    data = [value] * int(np.prod(shape))
    return [{"name": "x", "datatype": "UINT8", "shape": list(shape), "data": data}]


def blank_b64(image_format: str) -> str:
    return base64.b64encode(encoded(np.zeros((32, 32, 3), np.uint8), image_format)).decode()


BAD_V1 = [
    ([{"image_bytes": {"b64": "@@not base64@@"}}], "invalid base64"),
    ([{"image_bytes": {"b64": base64.b64encode(b"not an image").decode()}}], "not a decodable"),
    ([np.zeros((16, 16, 3), int).tolist()], "shape [16, 16, 3], expected [32, 32, 3]"),
    # Refused by its outline before numpy copies it (30 M numbers took seconds).
    ([[0] * 30000], "instances[0]: shape [30000], expected [32, 32, 3] (HWC)"),
    ([np.full((32, 32, 3), 300).tolist()], "integers in 0..255"),
    ([np.full((32, 32, 3), 0.5).tolist()], "integers in 0..255"),
    ([], "empty batch"),
    ([np.zeros((32, 32, 3), int).tolist()] * 9, "9 instances exceed the maximum of 8"),
    ([{"wrong": 1}], "image_bytes"),
    # A decompression bomb: 400 M pixels in 80 bytes, refused from its header.
    ([{"image_bytes": {"b64": png_header(20000, 20000)}}], "larger than the decoder accepts"),
    ([{"image_bytes": {"b64": png_header(12000, 12000)}}], "12000x12000, more than the 4194304"),
    ([{"image_bytes": {"b64": png_header(32, 32)}}], "not a decodable PNG, JPEG, BMP or WEBP"),
    ([{"image_bytes": {"b64": png16_b64()}}], "image mode I;16 is not supported"),
    # Formats training does not read: an ICO decodes its largest frame while it opens.
    ([{"image_bytes": {"b64": blank_b64("ICO")}}], "not a decodable PNG, JPEG, BMP or WEBP"),
    ([{"image_bytes": {"b64": blank_b64("GIF")}}], "not a decodable PNG, JPEG, BMP or WEBP"),
    # Counted before any is decoded: else this would answer "invalid base64".
    ([{"image_bytes": {"b64": "@@"}}] * 9, "9 instances exceed the maximum of 8"),
]


def test_every_format_training_reads_is_served(server: SimpleNamespace) -> None:
    instances = [{"image_bytes": {"b64": blank_b64(f)}} for f in ("PNG", "JPEG", "BMP", "WEBP")]
    code, body = v1(server, instances)
    assert code == 200 and len(body["predictions"]) == 4, body


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
            [{"name": "x", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 30000}],
            "input x: 30000 values do not fill shape [1, 32, 32, 3]",
        ),
        (uint8_input(0, (32, 32, 3)), "[N,H,W,C]"),
        (uint8_input(0, (-1, 32, 32, 3)), "shape [-1, 32, 32, 3] has a negative size"),
        (uint8_input(300), "x[0]: values must be integers in 0..255"),
        (uint8_input(-1), "x[0]: values must be integers in 0..255"),
        (uint8_input(0.5), "x[0]: values must be integers in 0..255"),
        (uint8_input(0, (9, 32, 32, 3)), "9 instances exceed the maximum of 8"),
        ([{"name": "x", "datatype": "FOO", "shape": [1], "data": [1]}], "datatype FOO; use BYTES"),
        (
            [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [png_header(20000, 20000)]}],
            "x[0]: image is larger than the decoder accepts",
        ),
        ([{"name": "x", "datatype": "BYTES", "shape": [9], "data": ["@@"] * 9}], "9 instances"),
    ],
)
def test_bad_v2_input_is_a_400(server, inputs, message) -> None:
    code, body = v2(server, inputs)
    assert code == 400, body
    assert message in body["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "the body is not valid JSON (Expecting property name"),
        (b'{"foo": 1}', "inputs: Field required; a V2 request is {inputs: [{name,"),
        (b'{"inputs": 5}', "inputs: Input should be a valid list (got 5)"),
        (b'{"inputs": [{"name": "x", "shape": [1], "data": [0]}]}', "inputs[0].datatype: Field"),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": ["a"], "data": [0]}]}',
            "inputs[0].shape[0]: Input should be a valid integer",
        ),
    ],
)
def test_a_v2_body_outside_the_schema_is_a_one_line_400(server, body, message) -> None:
    """Not FastAPI's 422 with a dump of every error: the field and its problem, in one line."""
    url = f"{server.base}/v2/models/{NAME}/infer"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    answer = json.loads(err.value.read())
    assert list(answer) == ["error"] and "\n" not in answer["error"]
    assert message in answer["error"]


def test_a_body_over_max_body_mb_is_a_413_and_the_server_stays_up(server: SimpleNamespace) -> None:
    """Refused from its Content-Length before it is read, or, sent in chunks, once past the
    limit (1 MB here); KServe read any body whole. The server goes on answering."""
    body = b'{"instances": [' + b"0," * 600_000 + b"0]}"  # 1.2 MB

    def chunks() -> Iterator[bytes]:
        yield from (body[i : i + 65536] for i in range(0, len(body), 65536))

    for path in (f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"):
        for data in (body, chunks()):
            resp = requests.post(server.base + path, data=data, timeout=30)
            assert resp.status_code == 413, resp.text
            assert "over the 1 MB the server reads (serving.max_body_mb)" in resp.json()["error"]
    code, answer = v1(server, server.images[:1].tolist())
    assert code == 200, answer


def test_no_client_can_unload_the_model(server: SimpleNamespace) -> None:
    """KServe's model repository extension let any client that can predict unload the model
    for good: its load then failed, and the server stayed live without it. Load and unload
    are refused, as are a version in the path and :explain, each a 501 and one log line."""
    for action in ("unload", "load"):
        resp = requests.post(f"{server.base}/v2/repository/models/{NAME}/{action}", timeout=30)
        assert resp.status_code == 501, resp.text
        assert "does not load or unload models: start it with another" in resp.json()["error"]
    server_meta = requests.get(f"{server.base}/v2", timeout=30).json()
    assert server_meta["name"] == "kserve" and server_meta["extensions"] == []  # none it refuses
    for method, path in (
        ("GET", f"/v2/models/{NAME}/versions/1/ready"),
        ("POST", f"/v1/models/{NAME}:explain"),
    ):
        resp = requests.request(method, server.base + path, json={"instances": []}, timeout=30)
        assert resp.status_code == 501, resp.text
    assert requests.get(f"{server.base}/v2/models/{NAME}/ready", timeout=30).status_code == 200
    assert v1(server, server.images[:1].tolist())[0] == 200
    log = (server.dir / "server.log").read_text()
    assert f"WARNING:mlops.serving:501 POST /v2/repository/models/{NAME}/unload: this" in log


def test_no_header_or_path_a_client_sends_is_a_500_or_a_forged_log_line(
    server: SimpleNamespace,
) -> None:
    """'²' passed str.isdigit() and failed int(): a 500 and two tracebacks. KServe's timing
    line quotes the decoded path: %0A in it began a log line of the client's choosing. A
    client gone mid-body was two tracebacks and a 500 in that timing line."""
    log_path = server.dir / "server.log"
    before = log_path.stat().st_size
    resp = requests.post(
        f"{server.base}/v2/models/{NAME}/infer",
        data=b'{"inputs":[]}',
        headers={"Content-Type": "application/octet-stream", INFERENCE_HEADER: "\u00b2"},
        timeout=10,
    )
    assert resp.status_code == 400 and "inference-header-content-length" in resp.json()["error"]
    assert requests.get(f"{server.base}/nothing%0AERROR:root:forged", timeout=10).status_code == 404
    port = int(server.base.rsplit(":", 1)[1])
    # Gone mid-body on V1 and V2 (where FastAPI's "error parsing the body" wraps it: a 400
    # warning that blamed the body).
    for path in (f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                'application/json\r\nContent-Length: 1000\r\n\r\n{"inst'.encode()
            )
    with urllib.request.urlopen(f"{server.base}/v2/health/ready", timeout=5) as ready:
        assert ready.status == 200
    deadline = time.monotonic() + 30  # the server logs the disconnect once it reads on
    while log_path.read_bytes()[before:].decode().count("the client left") < 2:
        assert time.monotonic() < deadline, log_path.read_bytes()[before:].decode()
        time.sleep(0.1)
    added = log_path.read_bytes()[before:].decode().splitlines()
    assert not any(line.startswith(("ERROR", "Traceback")) for line in added), added
    assert not any("error parsing the body" in line for line in added), added
    assert any("nothing\\nERROR:root:forged" in line for line in added), added
    assert not any("http_status:500" in line for line in added), added


def forwards(server: SimpleNamespace) -> tuple[float, float]:
    """(forward passes, images) so far."""
    from benchmarks.serving import batch_stats

    return batch_stats(int(server.base.rsplit(":", 1)[1]), NAME)


def test_a_request_whose_client_left_is_dropped_not_run(server: SimpleNamespace) -> None:
    """uvicorn runs a handler to its end whatever its client does: a request abandoned while
    its 8 large images decoded was still run through the model."""
    log_path = server.dir / "server.log"
    before, counted = log_path.stat().st_size, forwards(server)
    big = io.BytesIO()
    Image.new("RGB", (2000, 2000), (120, 30, 200)).save(big, "png")
    b64 = base64.b64encode(big.getvalue()).decode()
    body = json.dumps({"instances": [{"image_bytes": {"b64": b64}}] * 8}).encode()
    port = int(server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.2)  # read, and decoding (about 0.3 s for the 8 on an idle machine)
    deadline = time.monotonic() + 30
    while "its request was dropped" not in log_path.read_bytes()[before:].decode():
        assert time.monotonic() < deadline, log_path.read_bytes()[before:].decode()
        time.sleep(0.1)
    # The next request is the only one the model saw since.
    code, _ = v1(server, server.images[:1].tolist())
    assert code == 200
    passes, images = forwards(server)
    assert (passes - counted[0], images - counted[1]) == (1, 1)


def test_client_errors_log_one_line_each_and_no_traceback(server: SimpleNamespace) -> None:
    """KServe's own handlers log each 400 and 404 at ERROR with a 30-line traceback."""
    mark = "log-mark"
    assert v2(server, [{"name": mark, "datatype": "FP32", "shape": [1], "data": [1.0]}])[0] == 400
    assert post_json(f"{server.base}/v2/models/{mark}/infer", {"inputs": []})[0] == 404
    log = (server.dir / "server.log").read_text()
    assert f"WARNING:mlops.serving:400 POST /v2/models/{NAME}/infer: input {mark}: datatype" in log
    assert f"WARNING:mlops.serving:404 POST /v2/models/{mark}/infer: Model with name" in log
    # The bad requests of the tests before this one, too, left no traceback; nor is there
    # FastAPI's warning about KServe's use of a deprecated class.
    # (A line, not text within one: a client's text is quoted on its warning's line.)
    lines = log.splitlines()
    assert not any(line.startswith(("Traceback", "ERROR:")) for line in lines), log
    assert "Warning" not in log


def forward_images(server: SimpleNamespace) -> tuple[float, float]:
    """(forward passes, images through them) so far, from the server's /metrics."""
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        for what in ("count", "sum"):
            if line.startswith(f'forward_batch_images_{what}{{model_name="{NAME}"}}'):
                found[what] = float(line.split()[-1])
    return found.get("count", 0.0), found.get("sum", 0.0)


def send(server: SimpleNamespace, images: np.ndarray, protocol: str) -> tuple[int, list[int], list]:
    """One request; the status, the class indices and the top-k probabilities it answered."""
    if protocol == "v1":
        code, body = v1(server, [{"image_bytes": {"b64": png_b64(i)}} for i in images])
        if code != 200:
            return code, [], []
        preds = body["predictions"]
        return (
            code,
            [p["index"] for p in preds],
            [sorted(p["probabilities"].values()) for p in preds],
        )
    data = {"name": "x", "datatype": "UINT8", "shape": list(images.shape)}
    code, body = v2(server, [{**data, "data": images.reshape(-1).tolist()}])
    if code != 200:
        return code, [], []
    out = {o["name"]: o["data"] for o in body["outputs"]}
    top = np.reshape(out["top_k_probability"], (len(images), -1))
    return code, out["class_index"], [sorted(row) for row in top.tolist()]


def test_concurrent_requests_each_get_exactly_their_own_rows(server: SimpleNamespace) -> None:
    """16 requests of 1..8 images at once, V1 and V2 mixed, share forward passes."""
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (i % 8 + 1, 32, 32, 3), dtype=np.uint8) for i in range(16)]
    passes, images = forward_images(server)
    with ThreadPoolExecutor(len(batches)) as pool:
        answers = list(pool.map(lambda i: send(server, batches[i], ("v1", "v2")[i % 2]), range(16)))
    for batch, (code, index, top) in zip(batches, answers, strict=True):
        expected = server.local.classify(batch)
        assert code == 200
        assert index == expected.argmax(1).tolist()
        want = expected.topk(3, dim=1).values.flip(1).tolist()
        assert np.allclose(top, want, atol=1e-5)
    after_passes, after_images = forward_images(server)
    assert after_images - images == sum(len(b) for b in batches)  # each image ran exactly once
    assert 1 <= after_passes - passes <= len(batches)


def test_a_bad_request_among_good_ones_fails_alone(server: SimpleNamespace) -> None:
    good = [server.images[i : i + 1] for i in range(4)] * 2
    bad = [np.zeros((16, 16, 3), int).tolist()]
    with ThreadPoolExecutor(len(good) + 1) as pool:
        bad_answer = pool.submit(v1, server, bad)
        answers = list(pool.map(lambda b: send(server, b, "v1"), good))
    code, body = bad_answer.result()
    assert code == 400 and "expected [32, 32, 3]" in body["error"]
    expected = server.local.classify(server.images).argmax(1).tolist()
    assert [a[:2] for a in answers] == [(200, [expected[i]]) for i in range(4)] * 2
    with urllib.request.urlopen(f"{server.base}/v2/models/{NAME}/ready", timeout=5) as resp:
        assert resp.status == 200


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


def test_a_registry_database_it_cannot_read_is_one_line(tmp_path: Path) -> None:
    """The state dir's sqlite registry, read in place: a locked or damaged file was
    SQLAlchemy's traceback. It is the store's failure, not the caller's (exit 1)."""
    from pipelines.mlflow_server import local_db
    from pipelines.registry import resolve

    db = local_db(tmp_path)
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database")
    cfg = load_config(overrides={"state_dir": str(tmp_path)}, environ={})
    with pytest.raises(PipelineError) as failed:
        resolve(cfg, "models:/tiny/1")
    assert type(failed.value) is PipelineError
    assert (
        str(failed.value)
        == f"cannot read the model registry sqlite:///{db}: file is not a database"
    )


def test_a_taken_port_is_a_config_error(server: SimpleNamespace) -> None:
    from pipelines.processes import require_free

    port = int(server.base.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"serving.port={port}: the port is in use"):
        require_free(port, "serving.port")


def tamper_weights(model_dir: Path) -> None:
    weights = bytearray((model_dir / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (model_dir / "model.safetensors").write_bytes(bytes(weights))


def edit_record(model_dir: Path, edit: Callable[[dict], object]) -> None:
    record = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps(edit(record)))


def drop(key: str) -> Callable[[dict], dict]:
    return lambda record: {k: v for k, v in record.items() if k != key}


def change(**fields: object) -> Callable[[dict], dict]:
    return lambda record: {**record, **fields}


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (tamper_weights, "model.safetensors: sha256 mismatch"),
        (
            lambda model_dir: edit_record(model_dir, drop("sha256")),
            "model.json: not a valid model record (sha256: Field required)",
        ),
    ],
    ids=["tampered", "no-sha256"],
)
def test_a_model_that_does_not_load_is_one_line_and_exit_1(
    tmp_path: Path, spoil: Callable[[Path], None], message: str
) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    spoil(model_dir)
    cfg = load_config("smoke", environ={})
    proc = subprocess.run(
        serving_command(model_dir, NAME, free_port(), cfg),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1  # DataError's: a failed step
    [line] = proc.stderr.strip().splitlines()  # one line: no traceback
    assert line.startswith("error: ") and message in line


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda record: [], "not a valid model record (the record: Input should be an object)"),
        (drop("sha256"), "(sha256: Field required)"),
        (drop("input"), "(input: Field required)"),
        (change(num_classes="5"), "(num_classes: Input should be a valid integer)"),
        (change(input={"shape": [3, 32]}), "input.shape: List should have at least 3 items"),
        (change(input={"shape": ["3", 32, 32]}), "input.shape.0: Input should be a valid integer"),
        # Every request would have been a 500 (an IndexError naming a class).
        (change(classes=CLASSES[:4]), "names 4 classes but num_classes is 5"),
        (change(stem="zzz"), "cannot build the network it describes from model.safetensors "),
        (change(weights="../model.safetensors"), "weights: String should match pattern"),
        (change(num_classes=7, classes=[*CLASSES, "x", "y"]), "(size mismatch for "),
    ],
    ids=[
        "list",
        "no-sha256",
        "no-input",
        "str-int",
        "short",
        "str-channels",
        "classes",
        "stem",
        "width",
        "path",
    ],
)
def test_a_bad_model_record_is_a_data_error(
    tmp_path: Path, edit: Callable[[dict], object], message: str
) -> None:
    model_dir = write_model_dir(tmp_path)
    edit_record(model_dir, edit)
    with pytest.raises(DataError) as err:
        load_model(model_dir)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{model_dir / 'model.json'}")


@pytest.mark.parametrize("weights", ["../model.safetensors", "/tmp/x/evil.pth", "a/b", ".."])
def test_a_model_record_naming_a_path_is_refused_before_any_download(
    store: ObjectStore, tmp_path: Path, weights: str
) -> None:
    """model.json names the weights' file, which the download writes in the model dir under
    that name: a path there wrote outside it (for verify-model, deploy and `serve` alike)."""
    store.ensure_buckets()
    record = json.loads((write_model_dir(tmp_path / "model") / "model.json").read_text())
    store.write_json(store.buckets.models, "m/run/model.json", {**record, "weights": weights})
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError, match="are not a file name in the model's folder"):
        download_model(store, f"s3://{store.buckets.models}/m/run/", dest)
    assert not any(dest.iterdir())


# --- the micro-batcher alone ------------------------------------------------------------------


def batcher_with_log(
    max_batch: int, wait_ms: float = 0.0, max_queued: int = 1024
) -> tuple[MicroBatcher, list[int]]:
    """A batcher whose forward returns each image's first pixel and logs its batch sizes;
    an image whose first pixel is 255 makes the whole forward fail."""
    sizes: list[int] = []

    def infer(images: np.ndarray) -> tuple[np.ndarray]:
        sizes.append(len(images))
        if (images[:, 0, 0, 0] == 255).any():
            raise RuntimeError("poisoned batch")
        return (images[:, 0, 0, 0].copy(),)

    return MicroBatcher("unit", infer, max_batch, wait_ms, max_queued), sizes


def images_of(*values: int) -> np.ndarray:
    return np.array(values, np.uint8).reshape(-1, 1, 1, 1)


def test_queued_requests_share_a_forward_and_get_their_own_rows() -> None:
    batcher, sizes = batcher_with_log(max_batch=64)
    requests = [images_of(*range(10 * i, 10 * i + i + 1)) for i in range(5)]

    async def burst() -> list:
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    answers = asyncio.run(burst())
    assert [a[0].tolist() for a in answers] == [r[:, 0, 0, 0].tolist() for r in requests]
    # The first request starts the worker; all five are queued before it runs.
    assert sizes == [15]
    # A later event loop (a new asyncio.run) gets a fresh worker.
    assert asyncio.run(burst())[4][0].tolist() == [40, 41, 42, 43, 44]


def test_batches_close_at_max_batch_and_never_split_a_request() -> None:
    batcher, sizes = batcher_with_log(max_batch=4)

    async def burst() -> list:
        sizes_in = (2, 2, 3, 6, 1)
        return await asyncio.gather(*(batcher.submit(images_of(*[n] * n)) for n in sizes_in))

    answers = asyncio.run(burst())
    assert [len(a[0]) for a in answers] == [2, 2, 3, 6, 1]
    assert sizes == [4, 3, 6, 1]  # 2+2; 3 (3+6 overflows); 6 alone (over max_batch); 1


def test_a_full_queue_refuses_a_request_and_takes_one_once_drained() -> None:
    from prometheus_client import REGISTRY

    from serving.batcher import Overloaded

    def shed() -> float:
        return REGISTRY.get_sample_value("requests_shed_total", {"model_name": "unit"}) or 0.0

    before = shed()
    batcher, sizes = batcher_with_log(max_batch=8, max_queued=3)

    async def scenario() -> list:
        burst = [images_of(1, 2), images_of(3), images_of(4, 5)]  # 2 + 1 fit, 2 more do not
        answers = await asyncio.gather(*(batcher.submit(r) for r in burst), return_exceptions=True)
        return [*answers, await batcher.submit(images_of(6, 7, 8, 9))]  # an empty queue: runs

    first, second, refused, later = asyncio.run(scenario())
    assert first[0].tolist() == [1, 2] and second[0].tolist() == [3]
    assert isinstance(refused, Overloaded) and "serving.max_queued_images=3" in str(refused)
    assert later[0].tolist() == [6, 7, 8, 9]
    assert sizes == [3, 4]
    assert shed() == before + 1  # /metrics counts every refusal


def test_images_waiting_to_be_decoded_count_against_the_bound() -> None:
    """Requests queued for the decoding thread held their bodies and waited, uncounted: 40
    clients of 8 large PNGs each waited up to 27 s, and none got a 503."""
    from serving.batcher import Overloaded

    batcher, _ = batcher_with_log(max_batch=8, max_queued=3)

    async def scenario() -> list:
        with batcher.decoding(2):
            with pytest.raises(Overloaded, match="2 images already wait"), batcher.decoding(2):
                pass
            with batcher.decoding(1):  # 3 fit
                refused = await asyncio.gather(batcher.submit(images_of(1)), return_exceptions=True)
        return [*refused, await batcher.submit(images_of(1, 2, 3, 4))]  # all decoded: runs

    refused, later = asyncio.run(scenario())
    assert isinstance(refused, Overloaded) and "3 images already wait" in str(refused)
    assert later[0].tolist() == [1, 2, 3, 4]


def test_overload_503s_log_a_line_per_interval_saying_how_many_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.requests import Request

    from serving.batcher import Overloaded
    from serving.rest import Throttle, client_error

    now = [100.0]
    handler = client_error(503, Throttle(10.0, clock=lambda: now[0]))
    scope = {"type": "http", "method": "POST", "path": "/v1/models/m:predict", "headers": []}
    request = Request(scope)

    def refuse(times: int) -> list:
        caplog.clear()
        with caplog.at_level("WARNING", logger="mlops.serving"):
            answers = [asyncio.run(handler(request, Overloaded("full"))) for _ in range(times)]
        assert [a.status_code for a in answers] == [503] * times
        assert json.loads(answers[-1].body) == {"error": "full"}
        return [r.getMessage() for r in caplog.records]

    assert refuse(5) == ["503 POST /v1/models/m:predict: full"]
    now[0] += 9.9
    assert refuse(1) == []
    now[0] += 0.1
    assert refuse(2) == ["503 POST /v1/models/m:predict: full (5 more since the last such line)"]


def test_a_failed_forward_fails_only_its_batch_and_the_worker_carries_on() -> None:
    batcher, sizes = batcher_with_log(max_batch=1)

    async def scenario() -> list:
        first = await asyncio.gather(
            batcher.submit(images_of(255)), batcher.submit(images_of(7)), return_exceptions=True
        )
        return [*first, await batcher.submit(images_of(8))]

    poisoned, good, later = asyncio.run(scenario())
    assert isinstance(poisoned, InferenceError) and "RuntimeError: poisoned batch" in str(poisoned)
    assert good[0].tolist() == [7] and later[0].tolist() == [8]
    assert sizes == [1, 1, 1]


def test_the_wait_window_opens_only_under_concurrent_load() -> None:
    """A long window: a lone request never waits for it, and a window that fills up to
    max_batch closes at once (else these would take a minute)."""
    batcher, sizes = batcher_with_log(max_batch=4, wait_ms=60_000)

    async def scenario() -> None:
        await asyncio.wait_for(batcher.submit(images_of(1)), 30)  # lone: no window
        await asyncio.gather(batcher.submit(images_of(2)), batcher.submit(images_of(3)))
        # The last batch was concurrent, so the next one waits for max_batch images.
        first = asyncio.ensure_future(batcher.submit(images_of(4)))
        await asyncio.sleep(0.05)
        rest = [batcher.submit(images_of(n)) for n in (5, 6, 7)]
        await asyncio.wait_for(asyncio.gather(first, *rest), 30)

    asyncio.run(scenario())
    assert sizes == [1, 2, 4]


def test_batching_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from serving.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", "unused", "--max_batch", "0"])
    assert exit_info.value.code == 2
    assert "--max_batch 0: Input should be greater than or equal to 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--http_port", "70000"], "--http_port 70000: choose a port in 1..65535"),
        (["--enable_grpc", "true"], "--enable_grpc: this server answers REST only"),
        (["--workers", "2"], "--workers 2: the server runs one process"),
        (["--ssl_certfile", "/nonexistent.pem"], "--ssl_certfile /nonexistent.pem: no such file"),
        (["--log_config_file", "/nonexistent.yaml"], "--log_config_file /nonexistent.yaml: no"),
        (["--max_asyncio_workers", "0"], "--max_asyncio_workers 0: give 1 or more"),
    ],
)
def test_flags_it_cannot_honour_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", "unused", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_kserve_flags_that_would_fail_after_the_load_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a traceback once the model had loaded (asgi-logger is not installed)."""
    from serving.__main__ import main

    bad_yaml, not_pem = tmp_path / "log.yaml", tmp_path / "cert.pem"
    bad_yaml.write_text("version: 1\nhandlers: [unclosed\n")
    not_pem.write_text("not a certificate\n")
    cases = [
        (["--access_log_format", "%(h)s"], "--access_log_format: needs the asgi-logger package"),
        (["--log_config_file", str(bad_yaml)], f"--log_config_file {bad_yaml}: not a logging"),
        (["--ssl_certfile", str(not_pem)], f"--ssl_certfile {not_pem}: not a PEM certificate"),
        (["--ssl_keyfile", str(not_pem)], "--ssl_keyfile: give its certificate too"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model_dir", "unused", *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    # KServe reads the log config only with --configure_logging on: not checked here either
    # (the exit is the missing model's).
    assert main(["--model_dir", "unused", "--configure_logging", "false", "--log_config_file",
                 str(bad_yaml)]) == 1  # fmt: skip
    assert "--log_config_file" not in capsys.readouterr().err
    # KServe parses the command line as it is imported: its usage error names this program.
    out = subprocess.run(
        [sys.executable, "-m", "serving", "--model_dir", "unused", "--http_port", "abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2 and out.stderr.startswith("usage: python -m serving"), out.stderr
    assert "argument --http_port: invalid int value: 'abc'" in out.stderr


def test_help_shows_the_defaults_it_runs_with() -> None:
    from serving.__main__ import build_parser

    text = " ".join(build_parser().format_help().split())
    assert f"(default: {ServingConfig().model_name})" in text
    # KServe's flags that do nothing here or are refused are not offered: --enable_grpc was,
    # with its default, as were a transformer's --predictor_host and --protocol.
    offered = {word.lstrip("-") for word in text.split() if word.startswith("--")}
    assert "http_port" in offered and "max_batch" in offered
    assert not offered & {"enable_grpc", "workers", "grpc_port", "predictor_host", "protocol"}


def test_a_taken_port_or_unknown_host_fails_before_the_load(
    server: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model dir that does not exist: it would fail differently had the load come first."""
    from serving.__main__ import main

    port = int(server.base.rsplit(":", 1)[1])
    assert main(["--model_dir", "unused", "--http_port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: --http_port {port}: cannot listen on 127.0.0.1:{port} (Address already in "
        "use); pass a free port\n"
    )
    host = "no.such.host.invalid"
    assert (
        main(["--model_dir", "unused", "--http_port", str(free_port()), "--bind_host", host]) == 2
    )
    assert f"error: --bind_host {host}: not an address of this machine" in capsys.readouterr().err


def test_a_backend_outside_the_choices_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from serving.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", "unused", "--backend", "tensorrt"])
    assert exit_info.value.code == 2
    assert "--backend: invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_the_server_runs_the_configured_backend(server: SimpleNamespace) -> None:
    """The fixture's server has the config's default, ONNX Runtime, and it checked itself."""
    assert load_config("smoke", environ={}).serving.backend == "onnxruntime"
    log = (server.dir / "server.log").read_text()
    assert "onnxruntime backend ready" in log and "of PyTorch's" in log


@pytest.mark.parametrize(
    "stem,flip_tta,shape",
    [("s2", True, (32, 32, 3)), ("cifar", False, (28, 28, 1)), ("s1pool", True, (32, 32, 3))],
)
def test_onnxruntime_answers_as_pytorch_does(
    tmp_path: Path, stem: str, flip_tta: bool, shape: tuple[int, int, int]
) -> None:
    """The exported graph computes what the PyTorch model does, flip TTA and one channel
    included, at batch sizes other than the one it was exported at."""
    chw = (shape[2], shape[0], shape[1])
    model_dir = write_untrained_model(tmp_path, CLASSES, stem, chw, seed=3, flip_tta=flip_tta)
    eager, onnx = (
        ImageClassifier(NAME, model_dir, ServingConfig(backend=b)) for b in ("torch", "onnxruntime")
    )
    eager.load()
    onnx.load()
    for n in (1, 7):
        images = np.random.default_rng(n).integers(0, 256, (n, *shape), dtype=np.uint8)
        want, got = eager.classify(images), onnx.classify(images)
        assert got.shape == want.shape == (n, len(CLASSES))
        assert (got - want).abs().max().item() <= 1e-5
        assert got.argmax(1).tolist() == want.argmax(1).tolist()


def test_a_backend_that_disagrees_with_pytorch_is_refused() -> None:
    from serving.backend import check_agreement

    probe = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)

    def reference(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1)[:, :5].astype(np.float32) / 50

    assert check_agreement(reference, reference, probe, "same") == 0.0
    with pytest.raises(PipelineError, match="the skewed backend's probabilities differ"):
        check_agreement(reference, lambda x: reference(x) * 1.1, probe, "skewed")
    with pytest.raises(PipelineError, match=r"serving\.backend=torch"):
        check_agreement(reference, lambda x: reference(x) * np.nan, probe, "nan")


def test_a_backend_that_cannot_start_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    model = ImageClassifier(NAME, write_model_dir(tmp_path), ServingConfig(backend="onnxruntime"))
    with pytest.raises(
        PipelineError, match=r"onnxruntime backend could not start \(ModuleNotFoundError"
    ):
        model.load()
    assert not model.ready


def test_the_backend_flag_reaches_the_model_settings() -> None:
    from serving.__main__ import build_parser, settings

    parser = build_parser()
    args = parser.parse_args(["--model_dir", "m", "--backend", "torch"])
    assert settings(parser, args).backend == "torch"
    assert settings(parser, parser.parse_args(["--model_dir", "m"])).backend == "onnxruntime"


def test_onnxruntime_writes_nothing_to_home_and_has_no_telemetry(tmp_path: Path) -> None:
    """Its telemetry would leave a device id and an event store in ~/.cache/Microsoft."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")
    }
    code = (
        "import sys; from pathlib import Path; from serving.model import ImageClassifier; "
        "from pipelines.config import ServingConfig; "
        "m = ImageClassifier('t', Path(sys.argv[1]), ServingConfig(backend='onnxruntime')); "
        "m.load(); "
        "import os; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(write_model_dir(tmp_path / "model"))],
        cwd=ROOT,
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert not list(home.rglob("*"))


def register(state: Path, uris: list[str], alias: str, version: int) -> str:
    """A local registry in the state dir as training leaves it: a version of NAME per URI,
    tagged with it, one under the alias. MLflow's own sqlite store, not a stand-in."""
    import mlflow

    from pipelines.mlflow_server import create_database, local_db
    from pipelines.registry import MODEL_URI_TAG

    local_db(state).parent.mkdir(parents=True)
    create_database(local_db(state))
    uri = f"sqlite:///{local_db(state)}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model(NAME)
    for model_uri in uris:
        client.create_model_version(NAME, model_uri, tags={MODEL_URI_TAG: model_uri})
    client.set_registered_model_alias(NAME, alias, str(version))
    return uri


def test_serve_two_models_on_two_ports_from_one_state_dir(s3, store, tmp_path: Path) -> None:
    """`serve` fetches a model from the store and serves it until stopped. A second one on
    another port (another version beside it) fetches into its own folder: the first server's
    files and log stay, and it keeps answering. A server outlives neither command's end.
    Without --model-uri, it serves the registry's champion of the model name; without
    serving.model_name, a model is served under the name training recorded."""
    store.ensure_buckets()
    state, servers, digests = tmp_path / "state", [], []
    register(state, [f"s3://models/{NAME}/run-{seed}/" for seed in (1, 2)], "champion", 2)
    try:
        for seed in (1, 2):
            model = write_model_dir(tmp_path / f"model-{seed}", seed=seed)
            meta = json.loads((model / "model.json").read_text())
            (model / "model.json").write_text(json.dumps({**meta, "name": NAME}))
            for file in model.iterdir():
                store.put_file("models", f"{NAME}/run-{seed}/{file.name}", file)
            digests.append(json.loads((model / "model.json").read_text())["sha256"])
            port = free_port()
            args = ["pipelines/run.py", "serve", "--port", str(port), "--state-dir", str(state)]
            if seed == 1:  # takes model.json's name (it is served as the default)
                args += ["--model-uri", f"s3://models/{NAME}/run-{seed}/"]
            else:  # models:/tiny@champion, v2
                args += ["--set", f"serving.model_name={NAME}"]
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**os.environ, **s3.env()},
                stdout=subprocess.PIPE,
                text=True,
            )
            servers.append((proc, port))
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(4)]  # printed once it is ready
            assert lines[-1] == "(Ctrl-C to stop)\n", lines
            found = f" ({NAME} v2, models:/{NAME}@champion)" if seed == 2 else ""
            assert lines[0] == f"serving s3://models/{NAME}/run-{seed}/{found}\n", lines
        folders = sorted(p for p in (state / "serving").iterdir() if p.is_dir())
        assert len(folders) == 2 and [p.name for p in folders] == sorted(
            f"{NAME}-{port}" for _, port in servers
        )
        for (_, port), digest in zip(servers, digests, strict=True):
            folder = state / "serving" / f"{NAME}-{port}"
            assert json.loads((folder / "model.json").read_text())["sha256"] == digest
            assert (folder.parent / f"{folder.name}.log").is_file()
            # Up, and its model answers: a request without images is the model's 400.
            url = f"http://127.0.0.1:{port}/v2/models/{NAME}/infer"
            assert post_json(url, {"inputs": []}) == (
                400,
                {"error": "expected one input tensor, got 0"},
            )
    finally:
        # SIGTERM, as a service manager stops it (a Ctrl-C is ignored where the tests run in
        # the background): the command stops its model server and exits 143. A SIGKILL runs
        # no clean-up: the server sees its driver end (processes.stop_with_owner) and stops.
        children = [c for proc, _ in servers for c in psutil.Process(proc.pid).children()]
        signals = (signal.SIGTERM, signal.SIGKILL)
        for (proc, _), sig in zip(servers, signals, strict=False):
            proc.send_signal(sig)
        codes = [proc.wait(timeout=60) for proc, _ in servers]
        assert codes == [143, -signal.SIGKILL][: len(servers)]
        assert not psutil.wait_procs(children, timeout=30)[1]


def test_a_registered_version_resolves_to_its_folder_or_says_what_is_there(
    tmp_path: Path,
) -> None:
    """models:/NAME/VERSION and models:/NAME@ALIAS resolve to the folder training tagged; a
    name, version, alias or tag that is not there is an error that lists what is."""
    from pipelines.registry import resolve

    state = tmp_path / "state"
    cfg = load_config(overrides={"state_dir": str(state)}, environ={})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, "pipelines/run.py", "serve", "--state-dir", str(state)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and not state.exists(), out.stderr  # nor any S3 server started
    assert out.stderr == (
        f"error: no model registry in {state} (no run has trained there): run the pipeline "
        "first, pass --state-dir of one that has, or --model-uri s3://models/NAME/RUN/\n"
    )
    uris = [f"s3://models/{NAME}/run-{seed}/" for seed in (1, 2)]
    registry = register(state, uris, "champion", 1)
    assert resolve(cfg, f"models:/{NAME}@champion") == (uris[0], f"{NAME} v1")
    assert resolve(cfg, f"models:/{NAME}/2/") == (uris[1], f"{NAME} v2")
    listing = f"({NAME} has versions 1, 2; aliases: champion=v1)"
    for uri in (f"models:/{NAME}@prod", f"models:/{NAME}/3"):
        with pytest.raises(ConfigError) as failed:  # the caller's to fix: exit 2
            resolve(cfg, uri)
        assert str(failed.value).startswith(f"{uri}: ") and str(failed.value).endswith(listing)
    with pytest.raises(ConfigError) as failed:
        resolve(cfg, "models:/synthetic-resnet18@champion")
    assert str(failed.value) == (
        f"models:/synthetic-resnet18@champion: no registered model synthetic-resnet18 in "
        f"{registry} (registered: {NAME}); pass --dataset, --set serving.model_name=NAME or "
        "--model-uri"
    )
    import mlflow

    mlflow.MlflowClient(registry, registry).create_model_version(NAME, "s3://elsewhere/")
    with pytest.raises(PipelineError, match=r"v3 of tiny has no mlops.model_uri tag"):
        resolve(cfg, f"models:/{NAME}/3")
