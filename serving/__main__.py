"""Serve a model dir with KServe: `python -m serving --model_dir DIR --model_name NAME`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# `python -m serving` from the repository root, or a container's WORKDIR.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kserve
from kserve import model_server
from kserve.protocol.rest import server as rest_server

from pipelines.config import ServingConfig
from serving.model import ImageClassifier, load_or_exit

DEFAULTS = ServingConfig()


def bind_rest_server(host: str) -> None:
    """KServe 0.21 binds its REST server to 0.0.0.0 with no flag to change it. Locally the
    server must listen on 127.0.0.1 only, so the class it builds is swapped for one that
    binds `host`. In a pod, --bind_host 0.0.0.0 keeps KServe's own behaviour."""

    class BoundRESTServer(rest_server.RESTServer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host
            self._server = rest_server._RefreshingServer(self.config)

    model_server.RESTServer = BoundRESTServer


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
    parser.add_argument(
        "--top_k", type=int, default=DEFAULTS.top_k, help="classes returned per image"
    )
    parser.add_argument(
        "--max_instances",
        type=int,
        default=DEFAULTS.max_instances,
        help="largest batch accepted per request",
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULTS.threads, help="torch intra-op threads"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model = ImageClassifier(
        args.model_name, args.model_dir, args.top_k, args.max_instances, args.threads
    )
    load_or_exit(model)
    bind_rest_server(args.bind_host)
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False, workers=1).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
