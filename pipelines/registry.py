"""MLflow's registry for `serve`: a models:/NAME@ALIAS or models:/NAME/VERSION URI, resolved to
the s3:// folder that version's training wrote."""

from __future__ import annotations

import logging
import re
from typing import Any

from pipelines.config import REGISTRY_ALIAS, PipelineConfig
from pipelines.errors import ConfigError, PipelineError
from pipelines.mlflow_server import local_db, wait_healthy

log = logging.getLogger("mlops.registry")

# The tag training sets on every version it registers: where its weights and model.json are.
# MLflow's own `source` points at the logged MLflow model, which the server does not read.
MODEL_URI_TAG = "mlops.model_uri"
# The tags verify-model sets on the version it gated: "passed" or "failed", and the score.
GATE_TAG, ACCURACY_TAG = "mlops.gate", "mlops.test_accuracy"
# MLflow's forms, less the deprecated stages (models:/NAME/Production).
ALIAS = REGISTRY_ALIAS.strip("^$")  # gate.alias's rule, unanchored
MODELS_URI = re.compile(
    rf"models:/(?P<name>[^/@'\"]+)(?:@(?P<alias>{ALIAS})|/(?P<version>[1-9]\d{{0,17}}))/?"
)  # a version fits the registry's 64-bit integer


def champion_uri(cfg: PipelineConfig) -> str:
    """The version the gate put in service, under the config's model name."""
    return f"models:/{cfg.model_name}@{cfg.gate.alias}"


def _registry(cfg: PipelineConfig) -> str:
    """The tracking server's URI, or the local state dir's database read in place: no server
    needs starting to look up one version (MLflow's client reads the sqlite store itself)."""
    if cfg.mlflow.tracking_uri:
        wait_healthy(cfg.mlflow.tracking_uri, cfg.mlflow.wait_s)
        return cfg.mlflow.tracking_uri
    db = local_db(cfg.state_dir)
    if not db.is_file():
        raise ConfigError(
            f"no model registry in {cfg.state_dir} (no run has trained there): run the pipeline "
            "first, pass --state-dir of one that has, or --model-uri s3://models/NAME/RUN/"
        )
    return f"sqlite:///{db}"


def resolve(cfg: PipelineConfig, uri: str) -> tuple[str, str]:
    """(the s3:// folder, "NAME vN") of a registered version."""
    match = MODELS_URI.fullmatch(uri)
    assert match is not None, uri  # the caller checked it, as a usage error
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    name, alias, version = match["name"], match["alias"], match["version"]
    registry = _registry(cfg)
    try:
        client = mlflow.MlflowClient(registry, registry)  # opens (and migrates) the database
        try:
            found = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, version)
            )
        except MlflowException as exc:
            # Listed only to say what is there: a lookup that finds its version reads nothing
            # more. A name, version or alias the registry does not hold is the caller's to fix
            # (exit 2); a registry that fails to answer is not. (MLflow answers an unknown
            # alias with INVALID_PARAMETER_VALUE.)
            refused = exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            error = ConfigError if refused else PipelineError
            raise error(_missing(client, registry, uri, name, exc)) from None
    except SQLAlchemyError as exc:
        # The state dir's own database, read in place: locked by a writer, or no database.
        why = getattr(exc, "orig", None) or exc
        raise PipelineError(f"cannot read the model registry {registry}: {why}") from None
    s3 = found.tags.get(MODEL_URI_TAG)
    if not s3:
        raise PipelineError(
            f"{uri}: v{found.version} of {name} has no {MODEL_URI_TAG} tag (it was not "
            "registered by this pipeline's trainer); pass --model-uri s3://models/NAME/RUN/"
        )
    if found.tags.get(GATE_TAG) == "failed":  # served as asked, but not without a word
        log.warning(
            "%s v%s failed the quality gate (test accuracy %s): serving it as asked",
            name,
            found.version,
            found.tags.get(ACCURACY_TAG, "?"),
        )
    return s3, f"{name} v{found.version}"


def _missing(client: Any, registry: str, uri: str, name: str, exc: Exception) -> str:
    """Why a registered version was not found, with what the registry holds instead."""
    from mlflow.exceptions import MlflowException

    try:
        names = [m.name for m in client.search_registered_models(max_results=1000)]
    except MlflowException as err:
        return f"cannot read the model registry {registry}: {err.message}"
    if name not in names:
        return (
            f"{uri}: no registered model {name} in {registry} (registered: "
            f"{', '.join(sorted(names)) or 'none'}); pass --dataset, --set serving.model_name="
            "NAME or --model-uri"
        )
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = sorted(client.get_registered_model(name).aliases.items())
    return (
        f"{uri}: {getattr(exc, 'message', exc)} ({name} has versions "
        f"{', '.join(map(str, versions)) or 'none'}; "
        f"aliases: {', '.join(f'{a}=v{v}' for a, v in aliases) or 'none'})"
    )
