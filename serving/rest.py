"""KServe's REST server, adapted: the host it binds, and client errors that log one line each."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import math
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kserve import model_server
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import trace_logger
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest import server as rest_server
from kserve.protocol.rest.v2_datamodels import InferenceRequest, RequestInput
from pydantic import NonNegativeInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipelines.errors import ConfigError
from pipelines.processes import bind_error
from serving.batcher import Overloaded

log = logging.getLogger("mlops.serving")
SHED_LOG_EVERY_S = 10.0  # at most one log line per this many seconds for the 503s of overload
MESSAGE_CHARS = 1000  # of an error message, which may quote the request
# Control characters, escaped in a log line: a client's input name with a newline in it wrote
# a line of its own choosing ("ERROR:kserve:...") into the log.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
UNPARSED = "There was an error parsing the body"  # FastAPI's, for gzip or deep nesting
V2_HINT = "a V2 request is {inputs: [{name, datatype, shape, data}]}"


def check_listen(host: str, port: int) -> None:
    """Bind once as uvicorn will, before the model loads (seconds): a taken port or a host this
    machine does not have is a one-line usage error now, not KServe's exit 3 after the load."""
    exc = bind_error(port, host)
    if exc is None:
        return
    why = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        raise ConfigError(
            f"--bind_host {host}: not an address of this machine ({why}); pass one it has, "
            "such as 127.0.0.1 (or 0.0.0.0 in a pod)"
        )
    raise ConfigError(
        f"--http_port {port}: cannot listen on {host}:{port} ({why}); pass a free port"
    )


class Throttle:
    """Admits one event per `every_s` seconds and counts the ones held back in between."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.next = float("-inf")
        self.held = 0

    def admit(self) -> int | None:
        """None to hold this one back; else how many were held back since the last admitted."""
        now = self.clock()
        if now < self.next:
            self.held += 1
            return None
        held, self.held, self.next = self.held, 0, now + self.every_s
        return held


def escaped(text: str) -> str:
    """Control characters as escapes: no line of a client's choosing reaches the log."""
    return CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


class EscapeControl(logging.Filter):
    """KServe's timing line (kserve.trace, on by default) quotes the request's decoded path:
    GET /x%0AERROR:root:forged wrote a line of the client's own into the server's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if CONTROL.search(text):
            record.msg, record.args = escaped(text), None
        return True


async def client_gone(request: Request, exc: Exception) -> Response:
    """A client that left mid-body (a timeout, a killed load generator): one line, not two
    tracebacks and a 500 in the timing log. 499 is nginx's code for it; nobody reads it."""
    log.info("%s %s: the client left before its request was read", request.method, request.url.path)
    return Response(status_code=499)


def bounded(text: str) -> str:
    """A message cut to MESSAGE_CHARS: one that quotes the request (a 5 MB string in a field
    of the wrong type) was as large as it, in the answer and in the log."""
    if len(text) <= MESSAGE_CHARS:
        return text
    return f"{text[:MESSAGE_CHARS]}... ({len(text)} characters)"


def client_error(
    status: int, throttle: Throttle | None = None
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A handler answering `status` with {"error": message} and logging one line, or with a
    throttle, the lines it admits, each saying how many it left out."""
    throttle = throttle or Throttle(0.0)

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        # KServe's own handlers log every client error at ERROR with a 30-line traceback: one
        # bad client would flood the log. The client's mistake needs one line, no traceback.
        text = bounded(str(exc.detail if isinstance(exc, StarletteHTTPException) else exc))
        held = throttle.admit()
        if held is not None:
            more = f" ({held} more since the last such line)" if held else ""
            log.warning(
                "%d %s %s: %s%s", status, request.method, request.url.path, escaped(text), more
            )
        headers = getattr(exc, "headers", None)  # an HTTPException's, such as 405's Allow
        return JSONResponse(status_code=status, content={"error": text}, headers=headers)

    return handler


invalid_input = client_error(400)


async def http_error(request: Request, exc: Exception) -> Response:
    # FastAPI's own refusals (a body it cannot parse, gzip or nested too deep; no such route;
    # a wrong method) answered {"detail": ...}: in the format of every other error instead.
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's wrapping, on a V2 body
        return await client_gone(request, exc.__cause__)
    if exc.detail == UNPARSED:  # FastAPI's words for any body json.loads raised on
        exc = StarletteHTTPException(400, f"{UNPARSED}: send it as JSON, uncompressed")
    return await client_error(exc.status_code)(request, exc)


def describe(errors: list[dict[str, Any]]) -> str:
    """FastAPI's validation errors of a request body as one line: the field, then the problem."""
    # The V2 body is InferenceRequest | bytes; the bytes alternative's error says nothing useful.
    errors = [e for e in errors if e["loc"][1:] != ("bytes",)] or errors
    if errors[0]["type"] == "json_invalid":
        why = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return f"the body is not valid JSON ({why} at character {errors[0]['loc'][-1]})"
    problems = []
    for e in errors[:3]:
        parts = [p for p in e["loc"] if p not in ("body", "InferenceRequest")]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        got = e.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float) else ""
        problems.append(f"{field or 'the body'}: {e['msg']}{shown}")
    return f"{'; '.join(problems)}; {V2_HINT}"


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI answers a body that fails its model with a 422 and a long dump of every error.
    assert isinstance(exc, RequestValidationError)
    return await invalid_input(request, InvalidInput(describe(list(exc.errors()))))


class BinaryInput(RequestInput):
    """An input of a binary-extension header: its data may follow the header instead."""

    shape: list[NonNegativeInt]
    data: list | None = None


class BinaryHeader(InferenceRequest):
    """The JSON header of a binary-extension body, checked as FastAPI checks a JSON body."""

    inputs: list[BinaryInput]


def binary_request(
    body: bytes, headers: dict, model_name: str, check_count: Callable[[int], None]
) -> InferRequest:
    """A V2 binary-extension body (a JSON header, then raw tensors) as an InferRequest, its
    header checked as FastAPI checks a JSON body. KServe read the header with no check at all:
    a field of the wrong type ("inputs": [1], "shape": null, "id": 7) was a 500 from deep inside
    it; it took each input's binary_data_size bytes as given, so a body shorter than declared,
    or with bytes left over, was served as though whole; and it made a UINT8 tensor a Python
    list one element at a time on the event loop: 9 s for a 12 MB body, when the server
    answered nothing else, its health checks included. Here a UINT8 tensor is a view of the
    body, and `check_count` (the model's) bounds a BYTES tensor before its elements are split."""
    declared = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
    if declared is None:
        # A JSON body sent without Content-Type: application/json (curl -d sends a form's),
        # which V1 takes as JSON: V2 takes it too, as a header with nothing after it.
        declared = str(len(body))
    # ASCII digits: str.isdigit() takes '²', which int() refuses (a 500 and a traceback).
    if not (declared.isascii() and declared.isdigit()) or not 0 < int(declared) <= len(body):
        raise InvalidInput(
            f"a binary body needs {INFERENCE_CONTENT_LENGTH_HEADER}: the byte length of the JSON "
            f"header it starts with (got {declared!r} for a body of {len(body)} bytes)"
        )
    length = int(declared)
    try:
        doc = json.loads(body[:length])
    except ValueError as exc:
        raise InvalidInput(
            f"the first {length} bytes of the body ({INFERENCE_CONTENT_LENGTH_HEADER}) are not "
            f"a JSON header ({exc})"
        ) from None
    try:
        header = BinaryHeader.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInput(describe(list(exc.errors()))) from None
    sizes = []
    for i, tensor in enumerate(header.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if tensor.data is None and (
            not isinstance(size, int) or isinstance(size, bool) or size < 0
        ):
            raise InvalidInput(
                f"inputs[{i}]: no data, and no binary_data_size (a byte count) for the bytes "
                "after the header"
            )
        sizes.append(size if tensor.data is None else 0)
    if sum(sizes) != len(body) - length:
        raise InvalidInput(
            f"the header declares {sum(sizes)} bytes of tensor data (binary_data_size), but "
            f"{len(body) - length} follow it"
        )
    inputs, offset = [], length
    for i, (tensor, size) in enumerate(zip(header.inputs, sizes, strict=True)):
        section = body[offset : offset + size]
        offset += size
        if tensor.data is not None:
            inputs.append(tensor)
            continue
        params = {k: v for k, v in (tensor.parameters or {}).items() if k != "binary_data_size"}
        data = _binary_data(i, tensor, section, check_count)
        inputs.append(tensor.model_copy(update={"data": data, "parameters": params or None}))
    return InferRequest.from_inference_request(
        header.model_copy(update={"inputs": inputs}), model_name
    )


# Base64 text, as a JSON request carries an image: a BYTES element that is not is its bytes.
BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=_\s-]*")


def _binary_data(
    i: int, tensor: BinaryInput, section: bytes, check_count: Callable[[int], None]
) -> Any:
    """An input's data from its bytes after the header. UINT8: a view of them, which the model
    checks against the tensor's shape. Another datatype than BYTES: none, as the model refuses
    it by name before it reads any. BYTES: each element is a uint32 length and its bytes, an
    image's own bytes as Triton's and KServe's clients send them (KServe 0.21 decoded them as
    UTF-8 and refused every image); elements that are base64 text already pass as they are."""
    datatype = tensor.datatype.upper()  # as KServe's InferInput reads it: "uint8" is UINT8
    if datatype == "UINT8":
        return np.frombuffer(section, np.uint8)
    if datatype != "BYTES":
        return []
    check_count(count := math.prod(tensor.shape))
    items, at = [], 0
    while at < len(section) and len(items) < count:
        if at + 4 > len(section):
            raise InvalidInput(f"inputs[{i}]: a BYTES element's 4-byte length is cut short")
        (n,) = struct.unpack_from("<I", section, at)
        item = section[at + 4 : at + 4 + n]
        if len(item) != n:
            raise InvalidInput(f"inputs[{i}]: a BYTES element of {n} bytes is cut short")
        at += 4 + n
        text = BASE64_TEXT.fullmatch(item) is not None
        items.append(item.decode() if text else base64.b64encode(item).decode())
    if len(items) < count or at < len(section):
        found = f"more than {count}" if at < len(section) else len(items)
        raise InvalidInput(f"inputs[{i}]: {found} BYTES elements for shape {tensor.shape}")
    return items


class BodyTooLarge(HTTPException):
    """A request body over serving.max_body_mb. An HTTPException, which FastAPI lets through
    as it reads a body (any other exception there becomes its 400 'error parsing the body')."""

    def __init__(self, size: int, limit: int):
        super().__init__(
            413,
            f"the request body is {size / 1e6:.1f} MB or more, over the {limit / 1e6:g} MB the "
            "server reads (serving.max_body_mb): send fewer or smaller images per request",
        )

    def __str__(self) -> str:
        return str(self.detail)


too_large = client_error(413)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is a 413, from its Content-Length before any
    of it is read, else as soon as its chunks pass the limit. KServe read whatever arrived: a
    body of gigabytes was held in memory whole, then parsed, before anything looked at it."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.limit:
                exc = BodyTooLarge(int(declared), self.limit)
                response = await too_large(Request(scope), exc)
                await response(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server stops reading at that length
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(seen, self.limit)
            return message

        await self.app(scope, counted, send)


class CancelOnDisconnect:
    """ASGI middleware: a request whose client leaves before its answer starts is cancelled.
    uvicorn runs a handler to its end whatever the client does: an abandoned request (a client
    that timed out, and maybe retried) was still decoded and run through the model, its cost
    added to the load that made it time out. The micro-batcher skips a cancelled request."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read, answering, left = asyncio.Event(), False, False

        async def reading() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read.set()
            return message

        async def sending(message: dict) -> None:
            nonlocal answering
            answering = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, reading, sending))

        async def watch() -> None:
            nonlocal left
            # Once the handler has the whole body it reads no more: the next message is the
            # client's disconnect, or (the answer sent) uvicorn's end of the request.
            await body_read.wait()
            if (await receive())["type"] == "http.disconnect" and not answering:
                left = True
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not left:  # this request's own task was cancelled (a shutdown): pass it on
                raise
            log.info(
                "%s %s: the client left before its answer; its request was dropped",
                scope["method"],
                escaped(scope["path"]),  # decoded: %0A in it is a newline
            )
        finally:
            watcher.cancel()


class OneModel(ModelRepositoryExtension):
    """KServe's model repository without load and unload. The server serves the one model it
    loaded at start: KServe's unload let any client that can predict take it away for good
    (its load then failed: the server stayed live, and the model gone), so both are refused."""

    async def load(self, model_name: str) -> None:
        raise NotImplementedError(
            "this server serves the one model it loaded at start, and does not load or unload "
            "models: start it with another --model_dir (on a cluster, change the "
            "InferenceService's storageUri)"
        )

    unload = load


class OneModelPlane(DataPlane):
    """KServe's data plane, whose V2 server metadata does not claim the model repository
    extension that OneModel refuses (KServe names it whatever the server supports), and which
    decodes a binary-extension body itself (binary_request)."""

    def metadata(self) -> dict:
        return {**super().metadata(), "extensions": []}

    def decode_inference_request(self, body: Any, headers: dict, model_name: str) -> Any:
        if not isinstance(body, bytes):  # a JSON body, which FastAPI has parsed and checked
            return super().decode_inference_request(body, headers, model_name)
        model = self.get_model_from_registry(model_name)
        return binary_request(body, headers, model_name, model.check_count)


def install_rest_server(host: str, max_body_mb: float) -> None:
    """KServe 0.21 binds its REST server to 0.0.0.0 with no flag to change it. Locally the
    server must listen on 127.0.0.1 only, so the class it builds is swapped for one that
    binds `host`. In a pod, --bind_host 0.0.0.0 keeps KServe's own behaviour. The same class
    registers the 400 handlers above over KServe's and FastAPI's own."""

    class BoundRESTServer(rest_server.RESTServer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host
            self._server = rest_server._RefreshingServer(self.config)

        def _add_middlewares(self, app: FastAPI) -> None:
            super()._add_middlewares(app)
            app.add_middleware(BodyLimit, limit=int(max_body_mb * 1e6))
            app.add_middleware(CancelOnDisconnect)

        def _add_exception_handlers(self, app: FastAPI) -> None:
            super()._add_exception_handlers(app)
            app.add_exception_handler(InvalidInput, invalid_input)
            app.add_exception_handler(ModelNotFound, client_error(404))
            # A version in the path, :explain, load and unload: not a fault of the server's.
            app.add_exception_handler(NotImplementedError, client_error(501))
            # Under overload a line per refused request would add load where there is none to
            # spare: a sample of lines, and every refusal counted on /metrics (requests_shed).
            app.add_exception_handler(Overloaded, client_error(503, Throttle(SHED_LOG_EVERY_S)))
            app.add_exception_handler(RequestValidationError, invalid_request)
            app.add_exception_handler(BodyTooLarge, too_large)
            app.add_exception_handler(StarletteHTTPException, http_error)
            app.add_exception_handler(ClientDisconnect, client_gone)

    trace_logger.addFilter(EscapeControl())
    model_server.RESTServer = BoundRESTServer
    model_server.ModelRepositoryExtension = OneModel
    model_server.DataPlane = OneModelPlane
