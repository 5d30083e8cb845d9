"""Step verify-data: the raw dataset is in raw-data/<dataset>/, complete, decodable and intact."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from data import manifest as mf
from data.raw import Files
from data.sources import READERS, check_expected, download_source, local_source, source_files
from pipelines.cli import step_main
from pipelines.config import PipelineConfig
from pipelines.console import parallel_map, progress
from pipelines.errors import DataError, IntegrityError
from pipelines.storage import ObjectStore, s3_uri, sha256_file

log = logging.getLogger("mlops.verify_data")


@dataclass
class VerifyDataResult:
    dataset: str
    manifest_uri: str
    content_sha256: str
    objects: int
    uploaded: int
    uploaded_bytes: int
    decoded: bool
    classes: list[str]
    counts: dict[str, int]


def _check_store(
    store: ObjectStore, bucket: str, prefix: str, expected: dict[str, str], hint: str
) -> None:
    failures = list(store.failures(bucket, prefix, expected).values())
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise IntegrityError(
            f"{len(failures)} stored object(s) failed verification: {'; '.join(failures[:3])}"
            f"{more}. {hint}"
        )


def _put(
    store: ObjectStore,
    bucket: str,
    prefix: str,
    files: Files,
    hashes: dict[str, str],
    keys: list[str],
) -> None:
    parallel_map(
        lambda k: store.put_file(bucket, prefix + k, files[k], hashes[k]), keys, "uploading"
    )


def _upload(
    store: ObjectStore, bucket: str, prefix: str, files: Files, hashes: dict[str, str]
) -> list[str]:
    """Upload what is missing from the store or differs from the source; return those keys."""

    def differs(key: str) -> bool:
        info = store.stat(bucket, prefix + key)
        return info is None or info.size != files[key].stat().st_size or info.sha256 != hashes[key]

    stale = [
        k
        for k, d in zip(files, parallel_map(differs, files, "comparing with store"), strict=True)
        if d
    ]
    if stale:
        _put(store, bucket, prefix, files, hashes, stale)
    return stale


def _store_intact(
    store: ObjectStore, bucket: str, prefix: str, files: Files, hashes: dict[str, str]
) -> list[str]:
    """Read everything back; what differs from the source is uploaded again and checked once
    more (bit rot, or a copy that kept the metadata, looks current to _upload). Returns those
    keys."""
    damaged = sorted(store.failures(bucket, prefix, hashes))
    if damaged:
        log.warning("%d stored object(s) differ from the source: uploading again", len(damaged))
        _put(store, bucket, prefix, files, hashes, damaged)
        again = {k: hashes[k] for k in damaged}
        _check_store(store, bucket, prefix, again, "The store returns other bytes than it took")
    return damaged


def _remove_unlisted(store: ObjectStore, bucket: str, prefix: str, manifest: dict) -> None:
    """Remove the dataset's objects that its new manifest does not list: what a replaced
    source held and this one has not (a folder that lost images, a renamed class) stayed in
    the store for good. After the manifest, which no reader of the dataset gets past."""
    keep = {prefix + key for key in manifest["objects"]} | {prefix + mf.MANIFEST}
    gone = [info.key for info in store.list(bucket, prefix) if info.key not in keep]
    for key in gone:
        store.remove(bucket, key)
    if gone:
        log.info("removed %d stored object(s) the source no longer has", len(gone))


def verify_data(cfg: PipelineConfig, store: ObjectStore) -> VerifyDataResult:
    """Make sure the dataset is in the store and intact, uploading only what is missing."""
    ds, bucket = cfg.dataset, cfg.storage.buckets.raw
    prefix, cache = f"{ds.key}/", cfg.state_dir / "cache"
    manifest_uri = s3_uri(bucket, prefix + mf.MANIFEST)
    # Not MLflow's bucket: on a cluster the pipeline's MinIO user may not see it.
    store.ensure_buckets(cfg.storage.buckets.pipeline())
    source = local_source(ds, cache)
    manifest, damage = mf.read(store, bucket, prefix)
    if damage:
        # Written last, as the upload's commit marker: rebuilt from a source, as a missing
        # one is. It was a traceback, or "not valid JSON" on every run, with no way out.
        if source is None:
            raise DataError(
                f"{manifest_uri} is damaged ({damage}): re-run with --data pointing at the "
                "original source to check the stored objects and write it again"
            )
        log.warning("%s is damaged (%s): it is written again from the source", manifest_uri, damage)
        manifest = None
    if manifest is not None and manifest.get("dataset") != ds.name:
        raise DataError(
            f"{manifest_uri} describes a {manifest.get('dataset')} dataset, not {ds.name}: "
            "set dataset.id to store them apart"
        )
    if source is None and manifest is None:
        try:
            source = download_source(ds, cache)
        except DataError:
            if next(store.list(bucket, prefix), None) is None:
                raise
            # It said the data was "neither in the store nor given", beside all its objects.
            raise DataError(
                f"{s3_uri(bucket, prefix)} holds objects but no {mf.MANIFEST}, which an upload "
                "writes last (one cut short, or the file removed): re-run with --data "
                "pointing at the original source to check them and write it"
            ) from None

    uploaded: list[str] = []
    decoded = False
    if source is None:
        assert manifest is not None
        log.info("no local source: verifying %s against its manifest", s3_uri(bucket, prefix))
        _check_store(
            store,
            bucket,
            prefix,
            mf.object_hashes(manifest),
            "Re-run with --data pointing at the original source to re-upload them",
        )
    else:
        files = source_files(ds.name, source)
        hashes = {
            k: sha256_file(p)
            for k, p in progress(files.items(), "hashing source", total=len(files), unit="file")
        }
        unchanged = manifest is not None and mf.object_hashes(manifest) == hashes
        if not unchanged:
            # Decoded from the local files before the store is touched: a source that does not
            # decode leaves the stored dataset, and its manifest, as they were.
            raw = READERS[ds.name](files, ds.image_size)
            check_expected(ds.name, raw)
        if manifest is not None and not unchanged:
            # The content changes: drop the old commit marker first, so that a reader never
            # sees a manifest that describes half-replaced objects.
            log.info("source differs from %s: replacing the stored dataset", manifest_uri)
            store.remove(bucket, prefix + mf.MANIFEST)
        uploaded = _upload(store, bucket, prefix, files, hashes)
        uploaded += [
            k for k in _store_intact(store, bucket, prefix, files, hashes) if k not in uploaded
        ]
        if not unchanged:
            sizes = {k: (hashes[k], p.stat().st_size) for k, p in files.items()}
            manifest = mf.build(ds.name, ds.key, sizes, raw, str(source))
            store.write_json(bucket, prefix + mf.MANIFEST, manifest)  # last: the commit marker
            decoded = True
            _remove_unlisted(store, bucket, prefix, manifest)

    assert manifest is not None
    objects = manifest["objects"]
    nbytes = sum(objects[k]["size"] for k in uploaded)
    if uploaded:
        log.info("uploaded %d of %d objects (%.1f MB)", len(uploaded), len(objects), nbytes / 1e6)
    else:
        log.info("all %d objects already present and verified: uploaded nothing", len(objects))
    return VerifyDataResult(
        dataset=ds.key,
        manifest_uri=manifest_uri,
        content_sha256=manifest["content_sha256"],
        objects=len(objects),
        uploaded=len(uploaded),
        uploaded_bytes=nbytes,
        decoded=decoded,
        classes=manifest["classes"],
        counts=manifest["counts"],
    )


def main(argv: list[str] | None = None) -> int:
    return step_main(
        lambda cfg, store, _: verify_data(cfg, store),
        "components.verify_data",
        __doc__,
        ["--dataset", "--data", "--state-dir"],
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
