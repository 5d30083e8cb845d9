"""The KServe model: V1 and V2 image classification, micro-batched, with typed 400 errors."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kserve import InferInput, InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image, UnidentifiedImageError

from data.imagefolder import COLOR_MODES, GRAY_MODES, fit_image
from data.raw import IMAGE_FORMATS
from pipelines.config import ServingConfig
from serving.backend import Backend, Forward, build_forward, softmax
from serving.batcher import MicroBatcher, Rows
from serving.loader import load_model

EIGHT_BIT_MODES = GRAY_MODES | COLOR_MODES  # what training decodes (data/imagefolder.py)
NAMED_FORMATS = ", ".join(IMAGE_FORMATS[:-1]) + f" or {IMAGE_FORMATS[-1]}"  # PNG, ... or WEBP
# A V2 response's tensors, in order, and whether each has a top-k axis after the batch one.
OUTPUTS = (
    ("class_index", "INT64", False),
    ("class_name", "BYTES", False),
    ("top_k_index", "INT64", True),
    ("top_k_probability", "FP32", True),
)


def outline(value: Any) -> list[int]:
    """The sizes of nested lists along their first elements: what a well-formed array's shape
    is, found without walking it. numpy finds the rest (a ragged array) once sizes agree."""
    if isinstance(value, np.ndarray):  # an InferRequest built in-process
        return list(value.shape)
    sizes = []
    while isinstance(value, list | tuple):
        sizes.append(len(value))
        if not value:
            break
        value = value[0]
    return sizes


def _flag(parameters: dict | None, key: str, where: str) -> None:
    value = (parameters or {}).get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: {key} must be true or false, got {value!r}")


class ImageClassifier(Model):
    """Ready only once the weights are loaded (sha256-checked, safetensors only). Its backend is
    eager PyTorch unless told: the in-process reference; the server passes serving.backend."""

    def __init__(self, name: str, model_dir: Path, settings: ServingConfig | None = None):
        super().__init__(name)
        # Unless told, the config tree's defaults, but eager PyTorch: the in-process reference.
        sv = settings or ServingConfig(backend="torch")
        self.backend: Backend = sv.backend
        self.model_dir = model_dir
        self.top_k = sv.top_k
        self.max_instances = sv.max_instances
        self.max_decode_pixels = sv.max_decode_pixels
        self.threads = sv.threads
        self.batcher = MicroBatcher(
            name, self.infer, sv.max_batch, sv.batch_wait_ms, sv.max_queued_images
        )
        self.forward: Forward | None = None
        self.meta: dict[str, Any] = {}
        # Requests are decoded on a thread of their own, one at a time as on the event loop
        # before: there, 64 photos of 4 M pixels held up every other request, health checks
        # included, for 3 s. PIL and the forward pass release the GIL, so the two overlap.
        self.parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")

    def load(self) -> bool:
        # One intra-op thread: on 2 cores the default pool gave ~500 ms latency spikes.
        torch.set_num_threads(self.threads)
        net, self.meta = load_model(self.model_dir)
        self.classes: list[str] = self.meta["classes"]
        self.channels, self.height, self.width = self.meta["input"]["shape"]
        shape = (self.height, self.width, self.channels)
        self.forward = build_forward(net, self.backend, self.threads, shape)
        self.top_k = min(self.top_k, len(self.classes))
        self.ready = True
        return self.ready

    # --- V2 model metadata (GET /v2/models/NAME): what a client builds its request from -------

    def get_input_types(self) -> list[dict]:
        # The tensor form; encoded PNG or JPEG images go as one BYTES tensor of shape [N].
        if not self.ready:
            return []
        return [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [-1, self.height, self.width, self.channels],
            }
        ]

    def get_output_types(self) -> list[dict]:
        return [
            {"name": name, "datatype": dtype, "shape": [-1, self.top_k] if top_k else [-1]}
            for name, dtype, top_k in OUTPUTS
        ]

    # --- decoding ------------------------------------------------------------------------------

    def _decode_image(self, data: bytes, where: str) -> np.ndarray:
        # The size comes from the header and is checked before any pixel is decoded: a PNG of a
        # few KB can expand to gigabytes, and decoding it holds up every request (it runs on the
        # event loop, as parsing does).
        try:
            opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise InvalidInput(
                f"{where}: image is larger than the decoder accepts; the model takes "
                f"{self.width}x{self.height}"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InvalidInput(f"{where}: not a decodable {NAMED_FORMATS} image") from None
        with opened:
            # 16-bit or float pixels would be clipped, mostly to white, and still classified.
            if opened.mode not in EIGHT_BIT_MODES:
                raise InvalidInput(
                    f"{where}: image mode {opened.mode} is not supported: send an 8-bit "
                    "grayscale or color image (L or RGB), as the model was trained on"
                )
            mode, size = "L" if self.channels == 1 else "RGB", (self.width, self.height)
            width, height = opened.size
            opened.draft(mode, size)  # what a JPEG will decode to, still from its header
            if opened.size[0] * opened.size[1] > self.max_decode_pixels:
                raise InvalidInput(
                    f"{where}: image is {width}x{height}, more than the "
                    f"{self.max_decode_pixels} pixels the server decodes "
                    f"(serving.max_decode_pixels); resize it to the model's {size[0]}x{size[1]}"
                )
            try:
                img = fit_image(opened, mode, size)
            except (OSError, ValueError, SyntaxError):  # a valid header over damaged pixel data
                raise InvalidInput(f"{where}: not a decodable {NAMED_FORMATS} image") from None
        array = np.asarray(img, dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array

    def _b64(self, text: Any, where: str) -> bytes:
        if not isinstance(text, str | bytes):
            raise InvalidInput(f"{where}: b64 must be a base64 string")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: invalid base64") from None

    def _check_array(self, array: np.ndarray, where: str) -> np.ndarray:
        want = (self.height, self.width, self.channels)
        if array.ndim == 2 and self.channels == 1:
            array = array[..., None]
        if array.shape != want:
            raise InvalidInput(f"{where}: shape {list(array.shape)}, expected {list(want)} (HWC)")
        if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
            raise InvalidInput(f"{where}: values must be integers in 0..255 (uint8)")
        return array.astype(np.uint8)

    def check_count(self, count: int) -> None:
        """Checked before anything is decoded, so an oversized request costs no decoding."""
        if count < 1:
            raise InvalidInput("empty batch: send at least one image")
        if count > self.max_instances:
            raise InvalidInput(f"{count} instances exceed the maximum of {self.max_instances}")

    def _from_v1(self, payload: dict) -> list[np.ndarray]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise InvalidInput('expected {"instances": [...]}')
        self.check_count(len(instances))
        images = []
        for i, inst in enumerate(instances):
            where = f"instances[{i}]"
            if isinstance(inst, dict):
                b64 = inst.get("image_bytes", {})
                b64 = b64.get("b64") if isinstance(b64, dict) else None
                if b64 is None:
                    raise InvalidInput(f'{where}: expected {{"image_bytes": {{"b64": ...}}}}')
                images.append(self._decode_image(self._b64(b64, where), where))
            else:
                want = (self.height, self.width, self.channels)
                if math.prod(sizes := outline(inst)) != math.prod(want):
                    # Before numpy copies it: 30 M numbers for one image held the parse
                    # thread, and with it the event loop, for seconds.
                    raise InvalidInput(f"{where}: shape {sizes}, expected {list(want)} (HWC)")
                try:
                    array = np.asarray(inst)
                except ValueError:
                    raise InvalidInput(f"{where}: ragged array") from None
                images.append(self._check_array(array, where))
        return images

    def _tensor(self, tensor: InferInput) -> np.ndarray:
        """The tensor's data in its shape; UINT8 values as sent, for _check_array to judge."""
        if (count := math.prod(outline(tensor.data))) != math.prod(tensor.shape):
            # Checked before numpy copies the data (as for V1 above).
            raise InvalidInput(
                f"input {tensor.name}: {count} values do not fill shape {list(tensor.shape)}"
            )
        try:
            # Not as_numpy() for UINT8: its cast fails on 300 or -1 (a 500) and truncates 0.5.
            data = np.asarray(tensor.data) if tensor.datatype == "UINT8" else tensor.as_numpy()
            return data.reshape(tensor.shape)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(
                f"input {tensor.name}: data does not match its shape ({exc})"
            ) from None

    def _requested(self, request: InferRequest) -> list[RequestedOutput] | None:
        """The outputs a V2 request names (all when none), each in JSON or binary: its own
        binary_data, else the request's binary_data_output (KServe reads a missing one as
        JSON). A name the model has not is a 400 before the batch, not an error after it."""
        # JSON's "false" is true to Python: a string flag asked for binary it did not mean.
        _flag(request.parameters, "binary_data_output", "parameters")
        if not request.request_outputs:
            return None
        known = [name for name, _, _ in OUTPUTS]
        for wanted in request.request_outputs:
            if wanted.name not in known:
                raise InvalidInput(
                    f"output {wanted.name!r} is not one of this model's: {', '.join(known)}"
                )
            _flag(wanted.parameters, "binary_data", f"output {wanted.name}")
        binary = {"binary_data": bool(request.use_binary_outputs)}
        return [
            RequestedOutput(o.name, {**binary, **(o.parameters or {})})
            for o in request.request_outputs
        ]

    def _from_v2(self, request: InferRequest) -> list[np.ndarray]:
        if len(request.inputs) != 1:
            raise InvalidInput(f"expected one input tensor, got {len(request.inputs)}")
        tensor = request.inputs[0]
        shape = list(tensor.shape)
        if tensor.datatype not in ("UINT8", "BYTES"):
            raise InvalidInput(
                f"input {tensor.name}: datatype {tensor.datatype}; use BYTES or UINT8"
            )
        if any(n < 0 for n in shape):
            raise InvalidInput(f"input {tensor.name}: shape {shape} has a negative size")
        if tensor.datatype == "UINT8":
            if len(shape) != 4:
                raise InvalidInput(f"input {tensor.name}: UINT8 must be [N,H,W,C], got {shape}")
            self.check_count(shape[0])
            data = self._tensor(tensor)
            return [self._check_array(a, f"{tensor.name}[{i}]") for i, a in enumerate(data)]
        self.check_count(math.prod(shape))
        images = []
        for i, item in enumerate(self._tensor(tensor).reshape(-1)):
            where = f"{tensor.name}[{i}]"
            raw = item if isinstance(item, bytes) else str(item).encode()
            # Over HTTP, base64 text, in JSON and with the binary extension alike (rest.py
            # moves a binary body's elements into its header so); an InferRequest built
            # in-process may carry the image's own bytes.
            if not raw.startswith((b"\x89PNG", b"\xff\xd8")):
                raw = self._b64(raw, where)
            images.append(self._decode_image(raw, where))
        return images

    # --- inference -----------------------------------------------------------------------------

    def classify(self, images: np.ndarray) -> torch.Tensor:
        """Probabilities for uint8 NHWC images (also the in-process reference for tests)."""
        assert self.forward is not None
        return torch.from_numpy(softmax(self.forward(images)))

    def infer(self, images: np.ndarray) -> Rows:
        """Class index, top-k probabilities and top-k indices of a batch (the forward thread)."""
        probs = self.classify(images)
        top_p, top_i = probs.topk(self.top_k, dim=1)
        return probs.argmax(dim=1).numpy(), top_p.numpy(), top_i.numpy()

    def images_in(self, payload: dict | InferRequest | bytes) -> int:
        """How many images a request will be once decoded, from what it says before it is: its
        count of instances or its shape, or for an unparsed body, the most it may hold (at
        least 1, at most max_instances, past which it is refused before it is decoded)."""
        count = 1
        if isinstance(payload, bytes | str):
            # JSON sent without its content type (curl -d), parsed on the decoding thread: as
            # many as it may hold, rather than one.
            count = self.max_instances
        elif isinstance(payload, dict) and isinstance(payload.get("instances"), list):
            count = len(payload["instances"])
        elif isinstance(payload, InferRequest) and payload.inputs:
            shape = list(payload.inputs[0].shape)
            count = math.prod(shape[:1] if payload.inputs[0].datatype == "UINT8" else shape)
        return min(max(count, 1), self.max_instances)

    def parse(self, payload: dict | InferRequest | bytes) -> tuple[dict | InferRequest, np.ndarray]:
        """The request and its images as uint8 NHWC; every bad input is an InvalidInput (400)."""
        if isinstance(payload, bytes | str):
            # KServe hands over the raw body when the client sent no JSON content type (curl -d).
            try:
                payload = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InvalidInput("the request body is not JSON") from None
        images = (
            self._from_v2(payload)
            if isinstance(payload, InferRequest)
            else (self._from_v1(payload) if isinstance(payload, dict) else None)
        )
        if images is None:
            raise InvalidInput("expected a V1 instances object or a V2 inference request")
        return payload, np.stack(images)

    async def predict(
        self, payload: dict | InferRequest | bytes, headers: dict[str, str] | None = None
    ) -> dict | InferResponse:
        # Validated before it is queued, so a bad request never reaches (or fails) a batch.
        loop = asyncio.get_running_loop()
        with self.batcher.decoding(self.images_in(payload)):
            request, images = await loop.run_in_executor(self.parser, self.parse, payload)
        requested = self._requested(request) if isinstance(request, InferRequest) else None
        index, top_p, top_i = await self.batcher.submit(images)
        if isinstance(request, dict):
            return {
                "predictions": [
                    {
                        "class": self.classes[int(index[n])],
                        "index": int(index[n]),
                        "probabilities": {
                            self.classes[int(i)]: round(float(p), 6)
                            for p, i in zip(top_p[n], top_i[n], strict=True)
                        },
                    }
                    for n in range(len(images))
                ]
            }
        names = np.array([self.classes[int(i)].encode() for i in index], dtype=np.object_)
        arrays = (index.astype(np.int64), names, top_i.astype(np.int64), top_p.astype(np.float32))
        outputs = []
        for (name, dtype, _), array in zip(OUTPUTS, arrays, strict=True):
            out = InferOutput(name=name, shape=list(array.shape), datatype=dtype)
            out.set_data_from_numpy(array, binary_data=False)
            outputs.append(out)
        return InferResponse(
            # The protocol: an id given is returned, the empty one too.
            response_id=str(uuid.uuid4()) if request.id is None else request.id,
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=bool(request.use_binary_outputs),
            requested_outputs=requested,
        )
