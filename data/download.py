"""Explicit, user-requested dataset downloads: md5-checked, cached, and clear when offline."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.console import progress
from pipelines.errors import DataError

log = logging.getLogger("mlops.download")
TIMEOUT_S = 30
OFFLINE_HINT = "pass --data PATH to a local copy, or run `make demo` to use generated data"


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch url to dest unless a copy with the right md5 is cached there already."""
    if dest.exists() and md5_file(dest) == md5:
        log.info("using cached %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = iter(lambda: response.read(1 << 20), b"")
            for chunk in progress(
                chunks, f"download {dest.name}", total=total and -(-total >> 20), unit="MiB"
            ):
                fh.write(chunk)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DataError(f"cannot download {url} ({reason}); {OFFLINE_HINT}") from None
    actual = md5_file(part)
    if actual != md5:
        part.unlink()
        raise DataError(f"{url}: md5 {actual} does not match the published {md5}; {OFFLINE_HINT}")
    part.replace(dest)
    return dest
