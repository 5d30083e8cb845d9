"""nanio's own CLI, with SigV4 checked against the request path as the client sent and signed it.

python -m pipelines.s3serve serve [the `nanio serve` options]
"""

from __future__ import annotations

import sys

from nanio.auth.middleware import SigV4Middleware
from nanio.cli import main
from starlette.requests import Request

_verify = SigV4Middleware._verify


def _verify_raw_path(self: SigV4Middleware, request: Request) -> object:
    # nanio 0.1.7 signs the path Starlette has already decoded, and decodes it once more, so a
    # key that holds `%41` was checked as if it held `A` and refused (SignatureDoesNotMatch):
    # image files named from URLs (`cat%20001.jpg`) could not be uploaded. The raw path is the
    # one the client encoded, which nanio's canonical form (decode once, encode once) expects.
    raw = request.scope.get("raw_path")
    if raw:
        request = Request(dict(request.scope, path=raw.decode("latin-1")))
    return _verify(self, request)


SigV4Middleware._verify = _verify_raw_path  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
