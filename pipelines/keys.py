"""Write the random credentials an overlay's secretGenerators read: git-ignored, never committed.

    python -m pipelines.keys [local|production ...]     (make secrets)

Files that exist are kept: the cluster already runs with those keys.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from secrets import token_hex, token_urlsafe

import yaml

OVERLAYS = Path(__file__).resolve().parent.parent / "infrastructure" / "overlays"


def _s3_user(role: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": f"{role}-{token_hex(8)}",
        "AWS_SECRET_ACCESS_KEY": token_urlsafe(32),
    }


def generators(shared: dict[str, str]) -> dict[str, Callable[[], dict[str, str]]]:
    """Each env file's keys. `shared` holds values two files must agree on."""
    admin = shared.setdefault("admin", token_urlsafe(24))
    return {
        "s3-root.env": lambda: {
            "MINIO_ROOT_USER": f"root-{token_hex(8)}",
            "MINIO_ROOT_PASSWORD": token_urlsafe(32),
        },
        # One MinIO user per role (infrastructure/base/minio-setup.yaml creates them).
        "s3.env": lambda: _s3_user("pipeline"),
        "s3-mlflow.env": lambda: _s3_user("mlflow"),
        "s3-serving.env": lambda: _s3_user("serving"),
        # Hex: the password goes into a postgresql:// URL, where it must need no escaping.
        "postgres.env": lambda: {
            "POSTGRES_USER": "mlflow",
            "POSTGRES_PASSWORD": token_hex(24),
            "POSTGRES_DB": "mlflow",
        },
        "mlflow-auth.env": lambda: {
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": token_urlsafe(32),
        },
        "mlflow-client.env": lambda: {
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": admin,
        },
    }


def env_files(overlay: Path) -> list[str]:
    """The env files the overlay's kustomization.yaml reads (it is the one list of them)."""
    doc = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    return [env for gen in doc.get("secretGenerator", []) for env in gen.get("envs", [])]


def write(overlay: Path) -> list[Path]:
    """Write the overlay's missing env files (mode 0600); return the ones written."""
    gens, written = generators({}), []
    for name in env_files(overlay):
        path = overlay / name
        if path.exists():
            continue
        if name not in gens:
            raise SystemExit(f"error: no generator for {path}; write it by hand")
        lines = "".join(f"{k}={v}\n" for k, v in gens[name]().items())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(lines)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    names = sorted(p.name for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").exists())
    parser = argparse.ArgumentParser(prog="python -m pipelines.keys", description=__doc__)
    parser.add_argument(
        "overlays", nargs="*", metavar="OVERLAY", help=f"of {', '.join(names)} (default: all)"
    )
    chosen = parser.parse_args(argv).overlays or names
    if unknown := sorted(set(chosen) - set(names)):
        parser.error(f"unknown overlay {', '.join(unknown)}: choose from {', '.join(names)}")
    for name in chosen:
        written = write(OVERLAYS / name)
        print(f"{name}: wrote {', '.join(p.name for p in written) or 'nothing (all present)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
