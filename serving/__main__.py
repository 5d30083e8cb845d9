"""Serve a model dir with KServe: `python -m serving --model_dir DIR --model_name NAME`."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import ssl
import sys
import warnings
from pathlib import Path
from typing import Literal, get_args, get_origin

# `python -m serving` from the repository root, or a container's WORKDIR.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":
    # KServe parses the command line as it is imported: a flag of the wrong type (--http_port
    # abc) is its usage error, which named the program __main__.py.
    sys.argv[0] = "python -m serving"

import kserve
from fastapi.exceptions import FastAPIDeprecationWarning
from kserve import logging as kserve_logging
from kserve import model_server
from PIL import Image
from pydantic import ValidationError

from pipelines.config import PipelineConfig, ServingConfig
from pipelines.errors import PipelineError
from pipelines.processes import exit_now, stop_with_owner
from serving.launch import CONFIG_FLAGS
from serving.model import ImageClassifier
from serving.rest import check_listen, install_rest_server

DEFAULTS = ServingConfig()
# KServe's flags that do nothing here (a transformer's, gRPC's) or that main() refuses: still
# parsed, as KServe's own server takes them, but out of --help, which listed them with defaults.
HIDDEN = {
    "grpc_port",
    "max_threads",
    "enable_grpc",
    "workers",
    "predictor_host",
    "protocol",
    "predictor_protocol",
    "predictor_use_ssl",
    "predictor_request_timeout_seconds",
    "predictor_request_retries",
    "enable_predictor_health_check",
    "grpc_max_send_message_length",
    "grpc_max_receive_message_length",
    "access_log_format",
}


class ModelServer(kserve.ModelServer):
    """KServe's server, less its stop on a signal. uvicorn catches SIGTERM or SIGINT itself,
    shuts the REST server down, then raises the signal again for the handler it found, which
    was KServe's stop: that scheduled a shutdown task on the ending loop, which never ran
    ("coroutine ... was never awaited" in every server's log), and had nothing to stop in a
    one-process REST server anyway."""

    def register_signal_handler(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, lambda *_: None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        parents=[model_server.parser],  # KServe's own flags: --http_port, --model_name, ...
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model_dir",
        type=Path,
        required=True,
        help="folder holding model.json and model.safetensors",
    )
    parser.add_argument(
        "--bind_host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)"
    )
    # KServe's defaults where this server differs: REST only (its gRPC server would listen on
    # every address, whatever --bind_host says), and the config tree's model name.
    parser.set_defaults(enable_grpc=False, model_name=PipelineConfig().model_name)
    for action in parser._actions:  # argparse offers no public way to hide an inherited flag
        if action.dest in HIDDEN:
            action.help = argparse.SUPPRESS
    for name in CONFIG_FLAGS:
        field = ServingConfig.model_fields[name]
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        parser.add_argument(
            f"--{name}",
            type=str if choices else field.annotation,
            choices=choices,
            default=getattr(DEFAULTS, name),
            help=field.description,
        )
    return parser


def settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServingConfig:
    """The flags checked by ServingConfig's own bounds; a bad one is a one-line usage error."""
    try:
        return ServingConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS})
    except ValidationError as exc:
        parser.error("; ".join(f"--{e['loc'][0]} {e['input']}: {e['msg']}" for e in exc.errors()))


def check_kserve_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """KServe's own flags, which failed with a traceback only after the model had loaded."""
    for flag in ("ssl_certfile", "ssl_keyfile", "log_config_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag} {path}: no such file")
    if args.access_log_format is not None:
        parser.error(
            "--access_log_format: needs the asgi-logger package, which this server does not "
            "install; the access log keeps uvicorn's format"
        )
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl_keyfile: give its certificate too, with --ssl_certfile FILE")
    if args.ssl_certfile:
        try:  # as uvicorn will load them
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.ssl_certfile, args.ssl_keyfile
            )
        except (ssl.SSLError, OSError) as exc:
            parser.error(
                f"--ssl_certfile {args.ssl_certfile}: not a PEM certificate with its key "
                f"(--ssl_keyfile) ({exc})"
            )
    if args.log_config_file and args.configure_logging:  # KServe applies it only then
        try:  # as KServe will, at start: it logs with it from here on
            kserve_logging.configure_logging(args.log_config_file)
        except Exception as exc:  # dictConfig raises many kinds, all the file's fault
            parser.error(
                f"--log_config_file {args.log_config_file}: not a logging config that Python's "
                f"logging.config takes ({type(exc).__name__}: {exc})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sv = settings(parser, args)
    if not 1 <= args.http_port <= 65535:
        parser.error(f"--http_port {args.http_port}: choose a port in 1..65535")
    if args.enable_grpc:
        parser.error("--enable_grpc: this server answers REST only (V1 and V2 over HTTP)")
    check_kserve_flags(parser, args)
    if args.max_asyncio_workers is not None and args.max_asyncio_workers < 1:
        parser.error(f"--max_asyncio_workers {args.max_asyncio_workers}: give 1 or more")
    if args.workers != 1:
        # The micro-batcher gathers requests within one process; more replicas scale it out.
        parser.error(f"--workers {args.workers}: the server runs one process; add replicas")
    logging.basicConfig(level=logging.INFO)
    # KServe 0.21 answers V1 with FastAPI's ORJSONResponse, which this FastAPI deprecates: two
    # warnings in every server's log about KServe's code, nothing the user can act on.
    warnings.filterwarnings("ignore", "ORJSONResponse is deprecated", FastAPIDeprecationWarning)
    # PIL warns of a picture over 89 M pixels as it opens it; serving.max_decode_pixels then
    # refuses it with a 400 and its one log line (4 M pixels unless raised).
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    model = ImageClassifier(args.model_name, args.model_dir, sv)
    try:
        check_listen(args.bind_host, args.http_port)  # before the load, which takes seconds
        model.load()
    except PipelineError as exc:
        # A bad flag or model dir is one line and the error's exit code, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    install_rest_server(args.bind_host, sv.max_body_mb)
    stop_with_owner()
    # What is loaded by now (torch, KServe, the weights: ~0.5 M objects) lives as long as the
    # server. Frozen, the collector's full passes skip it; scanning it stalled every request
    # in flight for 0.1-0.25 s, a few times a minute under load.
    gc.collect()
    gc.freeze()
    # The forward thread takes the GIL back after every torch op; with the default 5 ms switch
    # interval it queued behind the busy event loop (a batch-8 forward beside a busy Python
    # thread: 36 ms at 5 ms, 20 ms at 1 ms).
    sys.setswitchinterval(0.001)
    ModelServer(http_port=args.http_port, enable_grpc=False, workers=1).start([model])
    return 0


if __name__ == "__main__":
    # The server has shut down (uvicorn drained its requests) and holds no state to save: it
    # ends sooner after a SIGTERM, which the deploy step waits for at the end of every local run.
    exit_now(main())
