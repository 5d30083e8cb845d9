"""A thin object-store layer over the official minio client: buckets, sha256 transfers, JSON."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error
from minio.helpers import check_bucket_name

from pipelines.config import StorageConfig
from pipelines.console import parallel_map
from pipelines.errors import ConfigError, IntegrityError, StorageError, server_said

log = logging.getLogger("mlops.storage")

# What a store call may raise: S3's error answers, an answer that is not S3's (another server on
# the port, a proxy's error page: InvalidResponseError was a traceback), a network failure.
FAILURES = (MinioException, urllib3.exceptions.HTTPError, OSError)
# S3's answers to keys it does not know, or to a user that may not use the bucket.
KEY_REFUSED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
SHA256_META = "sha256"  # stored as x-amz-meta-sha256: the minio client sends no checksums
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def s3_uri(bucket: str, key: str = "") -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    key = parsed.path.lstrip("/")
    # What the client refuses with a ValueError, which was a traceback: a '.' or '..' segment
    # (S3 keeps them as written: s3://models/a/../b/ is not s3://models/b/), a bucket name
    # outside S3's rules (too short, '..', an IP address).
    if {".", ".."} & set(key.split("/")):
        raise StorageError(f"{uri!r}: a '.' or '..' segment names no folder in S3; write it out")
    try:
        check_bucket_name(parsed.netloc)
    except ValueError as exc:
        raise StorageError(f"{uri!r}: {exc}") from None
    return parsed.netloc, key


def _short_read(exc: BaseException) -> urllib3.exceptions.IncompleteRead | None:
    """The short read behind a download's error (urllib3 wraps it in a ProtocolError)."""
    for cause in (exc, *getattr(exc, "args", ())):
        if isinstance(cause, urllib3.exceptions.IncompleteRead):
            return cause
    return None


class _NullSink:
    def seek(self, offset: int) -> None:
        pass

    def truncate(self) -> None:
        pass

    def write(self, block: bytes) -> None:
        pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    sha256: str | None  # from our metadata; None when something else wrote the object


# "ENDPOINT LOG" of the embedded S3 server, set where it runs and inherited by the steps and
# the trainer: an error that cannot reach it then names its log.
EMBEDDED_ENV = "MLOPS_EMBEDDED_S3"


class ObjectStore:
    """One S3 endpoint. Every store error surfaces as StorageError naming the endpoint and the
    object; a missing endpoint or missing keys is a ConfigError."""

    def __init__(self, cfg: StorageConfig):
        if not cfg.endpoint:
            raise ConfigError("no S3 endpoint configured: set MINIO_ENDPOINT")
        # Config errors (exit 2), as in cli.check_storage: a step whose pod got no keys from its
        # Secret fails here, before any request.
        if cfg.access_key is None or cfg.secret_key is None:
            raise ConfigError(
                f"no credentials for {cfg.endpoint}: set MINIO_ACCESS_KEY and MINIO_SECRET_KEY"
            )
        url = urlparse(cfg.endpoint)
        self.endpoint = cfg.endpoint.rstrip("/")
        self.buckets = cfg.buckets
        # Bounded timeouts and retries: an unreachable store fails in seconds, not minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s * 6),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[502, 503, 504]),
            maxsize=16,
        )
        self.client = Minio(
            url.netloc,
            access_key=cfg.access_key.get_secret_value(),
            secret_key=cfg.secret_key.get_secret_value(),
            secure=url.scheme == "https",
            region=cfg.region,
            http_client=http,
        )

    # --- error mapping --------------------------------------------------------------------

    def _fail(self, what: str, exc: Exception) -> StorageError:
        # A run's own server that died was blamed on a MINIO_ENDPOINT nobody had set.
        embedded, _, server_log = os.environ.get(EMBEDDED_ENV, "").partition(" ")
        if isinstance(exc, S3Error):
            # The embedded server's own failure (a full disk) says only "Please try again".
            see = f" (see {server_log})" if embedded == self.endpoint else ""
            if exc.code in KEY_REFUSED and not see:  # the embedded server's keys are its run's
                see = (
                    ": check MINIO_ACCESS_KEY and MINIO_SECRET_KEY, the keys of a user this "
                    "store lets use the bucket"
                )
            return StorageError(f"{what} on {self.endpoint}: {exc.code}: {exc.message}{see}")
        reason = getattr(exc, "reason", None)
        if isinstance(reason, urllib3.exceptions.SSLError):
            # A store that answered, but not as TLS allows: it read as "cannot reach", and
            # named only MaxRetryError.
            causes = (reason.__cause__, reason.__context__, *reason.args)
            if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
                return StorageError(
                    f"the S3 store at {self.endpoint} presented a certificate this machine does "
                    f"not trust ({what}: {server_said(reason)}): set SSL_CERT_FILE to a CA "
                    "bundle that holds its issuer"
                )
            return StorageError(
                f"no TLS connection to the S3 store at {self.endpoint} ({what}: "
                f"{server_said(reason)}): check MINIO_ENDPOINT's scheme (a plain-HTTP server "
                "is http://)"
            )
        if isinstance(exc, InvalidResponseError):
            return StorageError(
                f"{what}: {self.endpoint} answered HTTP {exc._code} with no S3 response "
                "(another server on that port?): check MINIO_ENDPOINT"
            )
        hint = (
            f"The run's embedded S3 server stopped answering: see {server_log}"
            if embedded == self.endpoint
            else "Check MINIO_ENDPOINT, or unset it to use the embedded server"
        )
        return StorageError(
            f"cannot reach the S3 store at {self.endpoint} ({what}): {type(exc).__name__}. {hint}"
        )

    # --- buckets ----------------------------------------------------------------------------

    def ensure_buckets(self, names: list[str] | None = None) -> None:
        names = names or list(self.buckets.model_dump().values())
        for name in names:
            try:
                if not self.client.bucket_exists(name):
                    self.client.make_bucket(name)
                    log.info("created bucket %s", name)
            except FAILURES as exc:
                raise self._fail(f"ensuring bucket {name}", exc) from None

    # --- objects ----------------------------------------------------------------------------

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            obj = self.client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"):
                return None
            raise self._fail(f"stat {s3_uri(bucket, key)}", exc) from None
        except FAILURES as exc:  # S3Error taken above
            raise self._fail(f"stat {s3_uri(bucket, key)}", exc) from None
        meta = {k.lower(): v for k, v in (obj.metadata or {}).items()}
        return ObjectInfo(key, obj.size or 0, obj.etag or "", meta.get(f"x-amz-meta-{SHA256_META}"))

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under prefix, recursively. sha256 is not listed (S3 lists no user metadata)."""
        try:
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                yield ObjectInfo(obj.object_name, obj.size or 0, obj.etag or "", None)
        except FAILURES as exc:
            raise self._fail(f"list {s3_uri(bucket, prefix)}", exc) from None

    def put_file(self, bucket: str, key: str, path: Path, sha256: str | None = None) -> str:
        sha256 = sha256 or sha256_file(path)
        try:
            self.client.fput_object(bucket, key, str(path), metadata={SHA256_META: sha256})
        except FAILURES as exc:
            raise self._fail(f"upload {s3_uri(bucket, key)}", exc) from None
        return sha256

    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            self.client.put_object(
                bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata={SHA256_META: sha256},
            )
        except FAILURES as exc:
            raise self._fail(f"upload {s3_uri(bucket, key)}", exc) from None
        return sha256

    def get_bytes(self, bucket: str, key: str, expected_sha256: str | None = None) -> bytes:
        """Read a whole object; with expected_sha256, raise IntegrityError on a mismatch."""
        buf = io.BytesIO()
        self._stream(bucket, key, buf, expected_sha256)
        return buf.getvalue()

    def check(self, bucket: str, key: str, expected_sha256: str) -> None:
        """Read an object through and raise IntegrityError unless its sha256 is as recorded."""
        self._stream(bucket, key, _NullSink(), expected_sha256)

    def failures(self, bucket: str, prefix: str, expected: dict[str, str]) -> dict[str, str]:
        """Read every object under prefix back against its sha256 (S3 itself gives no such
        guarantee); the keys that differ, with why."""

        def failed(key: str) -> str | None:
            try:
                self.check(bucket, prefix + key, expected[key])
            except IntegrityError as exc:
                return str(exc)
            return None

        keys = sorted(expected)
        found = parallel_map(failed, keys, "verifying stored objects")
        return {k: why for k, why in zip(keys, found, strict=True) if why}

    def get_file(
        self, bucket: str, key: str, path: Path, expected_sha256: str | None = None
    ) -> str:
        """Download to path atomically (via a part file) and return the content's sha256."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden name of its own: NAME.part was also the name of an object beside it (a
        # dataset holding x.png and x.png.part), which the parallel downloads then swapped.
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        part = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = self._stream(bucket, key, fh, expected_sha256)
            part.replace(path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return digest

    def _stream(self, bucket: str, key: str, sink: Any, expected_sha256: str | None) -> str:
        uri = s3_uri(bucket, key)
        for attempt in (1, 2):
            digest, response = hashlib.sha256(), None
            try:
                response = self.client.get_object(bucket, key)
                for block in response.stream(CHUNK):
                    digest.update(block)
                    sink.write(block)
                break
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    raise IntegrityError(f"{uri} is missing from the store") from None
                raise self._fail(f"download {uri}", exc) from None
            except FAILURES as exc:  # S3Error taken above
                short = _short_read(exc)
                if short is None:
                    raise self._fail(f"download {uri}", exc) from None
                if attempt == 2:
                    # Twice cut short: the stored bytes end there. (A file truncated under
                    # the embedded store was "cannot reach the S3 store", on every run.)
                    raise IntegrityError(
                        f"{uri}: the store sends {short.partial} of its "
                        f"{short.partial + (short.expected or 0)} bytes: the object is truncated"
                    ) from None
                sink.seek(0)  # once more from the start: a connection may break mid-way
                sink.truncate()
            finally:
                if response is not None:
                    response.close()
                    response.release_conn()
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            raise IntegrityError(
                f"{uri}: sha256 mismatch (recorded {expected_sha256[:12]}…, "
                f"stored object has {actual[:12]}…): the object is corrupt or was replaced"
            )
        return actual

    def remove(self, bucket: str, key: str) -> None:
        try:
            self.client.remove_object(bucket, key)
        except FAILURES as exc:
            raise self._fail(f"remove {s3_uri(bucket, key)}", exc) from None

    # --- JSON documents (manifests, metadata) ---------------------------------------------

    def read_json(self, bucket: str, key: str) -> dict[str, Any] | None:
        """A JSON document, checked against the sha256 write_json stored with it: a bit flipped
        in valid JSON (a digit of the normalisation, say) was read as written."""
        if (info := self.stat(bucket, key)) is None:
            return None
        raw = self.get_bytes(bucket, key, info.sha256)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{s3_uri(bucket, key)} is not valid JSON: {exc}") from None

    def write_json(self, bucket: str, key: str, doc: dict[str, Any]) -> str:
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        return self.put_bytes(bucket, key, data, content_type="application/json")
