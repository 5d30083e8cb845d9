"""Shared command-line plumbing: config flags from the config tree, exit codes, the store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipelines import state_lock
from pipelines.config import (
    ENV_VARS,
    PROFILES,
    PipelineConfig,
    describe_fields,
    load_config,
    load_yaml,
)
from pipelines.console import setup_logging
from pipelines.errors import (
    ConfigError,
    PipelineError,
    StorageError,
    expected,
    raise_on_sigterm,
    redeliver_interrupts,
    report,
    stopped_by,
)
from pipelines.mlflow_server import bound_retries
from pipelines.names import run_id_error
from pipelines.s3server import EmbeddedS3, with_embedded_store
from pipelines.storage import ObjectStore, parse_s3_uri

log = logging.getLogger("mlops")

# Flags that are shorthands for a config key. Their help and choices come from the field.
SHORTCUTS = {
    "--dataset": "dataset.name",
    "--data": "dataset.source",
    "--state-dir": "state_dir",
    "--epochs": "train.epochs",
    "--workers": "train.workers",
    "--port": "serving.port",
    "--namespace": "cluster.namespace",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the generated list of config keys in the epilog as written."""


def field_info(dotted: str) -> FieldInfo:
    model: type[BaseModel] = PipelineConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model.model_fields[leaf]


def _choices(info: FieldInfo) -> list[str] | None:
    if typing.get_origin(info.annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(info.annotation)]
    return None


def add_config_args(parser: argparse.ArgumentParser, shortcuts: list[str]) -> None:
    group = parser.add_argument_group(
        "configuration (precedence: flags > env > --config > profile)"
    )
    group.add_argument(
        "--profile",
        choices=list(PROFILES),
        # None when not given: a resumed run keeps its own (config_from_args's default).
        default=None,
        help="named profile: "
        + "; ".join(f"{n}: {f.__doc__}" for n, f in PROFILES.items())
        + " (default: quick)",
    )
    group.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file of config sections (default: none)"
    )
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.lr=0.1: the value is YAML, but a text "
        "key takes it as typed, and KEY= unsets an optional key (repeatable; keys listed "
        "below; default: none)",
    )
    for flag in shortcuts:
        dotted = SHORTCUTS[flag]
        info = field_info(dotted)
        group.add_argument(
            flag,
            dest=f"cfg:{dotted}",
            choices=_choices(info),
            metavar=None if _choices(info) else flag.strip("-").upper().replace("-", "_"),
            help=f"{info.description} [{dotted}] "
            f"(default: {info.get_default(call_default_factory=True)})",
        )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, in every process the command starts too (default: off)",
    )
    parser.epilog = "config keys (--set KEY=VALUE, or sections in --config FILE):\n" + "\n".join(
        describe_fields()
    )


def _takes_text(dotted: str) -> bool:
    """Whether the key's field holds text: a string, a path or a choice of words."""
    try:
        annotation = field_info(dotted).annotation
    except (KeyError, AttributeError):  # not a key of the tree: validation names it
        return False
    kinds = typing.get_args(annotation) or (annotation,)
    return any(kind in (str, Path) or isinstance(kind, str) for kind in kinds)


def parse_value(key: str, text: str) -> Any:
    """A --set value: YAML, except that a text field takes the text as typed (YAML would read
    4, 2024 and on as numbers and a boolean, `#...` as a comment, `&x` as an anchor). A quoted
    value is unquoted (the cluster's pods get JSON strings); null, ~ or nothing unsets."""
    if not text or text in ("null", "~"):
        return None  # `--set KEY=` unsets an optional key
    if _takes_text(key):
        if text[0] in "'\"":
            try:
                value = load_yaml(text)
            except yaml.YAMLError:
                return text
            return value if isinstance(value, str) else text
        return text
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "unreadable"
        raise ConfigError(f"--set {key}={text}: not a YAML value ({problem})") from None


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        out[key] = parse_value(key, text)
    return out


def config_from_args(
    args: argparse.Namespace, stored: list[str] | None = None, cluster: bool = False
) -> PipelineConfig:
    """The config the flags say; `stored`: a resumed run's settings, as `--set` values, under
    its --config file and flags. `cluster`: for the specs and the cluster's commands, which
    leave out the variables of this machine's store and tracking server (ENV_VARS): the pods
    read their own, and `make compile` in a shell with MINIO_REGION set wrote it into every
    spec, or failed on an MLFLOW_TRACKING_URI no pod would see."""
    overrides = parse_set(args.set)
    for name, value in vars(args).items():
        if name.startswith("cfg:") and value is not None:
            overrides[name[4:]] = value
    environ = {k: v for k, v in os.environ.items() if k not in ENV_VARS} if cluster else None
    return load_config(
        args.profile or "quick", args.config, overrides, environ, parse_set(stored or [])
    )


def s3_uri_arg(text: str) -> str:
    """argparse's type for an s3://BUCKET/KEY/ option: another form is a usage error (exit 2)
    that names the option, not a store error once the step has started."""
    try:
        parse_s3_uri(text)
    except StorageError as exc:
        why = str(exc) if text.startswith("s3://") else f"{text!r} is not an s3://BUCKET/KEY/ URI"
        raise argparse.ArgumentTypeError(why) from None
    return text


def run_id_arg(text: str) -> str:
    """argparse's type for --run-id: one folder name under models/NAME/ (a local run-... id, or
    an Argo workflow's name), not a path."""
    if (why := run_id_error(text)) is not None:
        raise argparse.ArgumentTypeError(why)
    return text


def step_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=(doc or "").strip(), formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--result",
        type=Path,
        metavar="FILE",
        help="also write the step's result as JSON to FILE, e.g. for an Argo "
        "output parameter (default: stdout only)",
    )
    return parser


def make_dir(path: Path, setting: str, hint: str, mode: int = 0o777) -> None:
    """Create the folder `setting` names, if need be (`mode`, less the umask, for the folder
    itself), and check this process can write in it: a bad path is a config error before any
    work, not an OSError after it."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{setting}: {path} is a file, not a folder; {hint}") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot create {path} ({exc.strerror}); {hint}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting}: the folder {path} is not writable; {hint}")


def check_state_dir(cfg: PipelineConfig) -> None:
    # Its owner's only, when made here: it holds the embedded store's objects and MLflow's
    # database, which the servers on 127.0.0.1 guard with per-run keys, and which other users
    # of the machine could read, as files, beside them. A folder that exists keeps its mode.
    make_dir(cfg.state_dir, "state_dir", "pass --state-dir DIR", mode=0o700)


def check_storage(cfg: PipelineConfig) -> None:
    """Keys for a configured store (an embedded one makes its own)."""
    storage = cfg.storage
    if storage.endpoint and (storage.access_key is None or storage.secret_key is None):
        raise ConfigError(
            f"storage.endpoint={storage.endpoint} needs credentials: set MINIO_ACCESS_KEY and "
            "MINIO_SECRET_KEY, or unset MINIO_ENDPOINT to use an embedded store"
        )


def check_result(path: Path) -> None:
    """A step's --result file can be written: checked before the step's work, not after."""
    if path.is_dir():
        raise ConfigError(f"--result {path} is a folder: pass --result FILE")
    make_dir(path.parent, f"--result {path}", "pass --result FILE in a writable folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"--result {path} is not writable: pass --result FILE")


@contextmanager
def open_store(cfg: PipelineConfig, command: str) -> Iterator[tuple[PipelineConfig, ObjectStore]]:
    """The configured store, or an embedded one for as long as the block runs. `command` names
    this one to another that finds the state dir held."""
    check_state_dir(cfg)
    check_storage(cfg)
    if cfg.storage.endpoint:
        yield cfg, ObjectStore(cfg.storage)
        return
    with state_lock.hold(cfg.state_dir, command), EmbeddedS3(cfg.state_dir / "s3") as server:
        cfg = with_embedded_store(cfg, server)
        yield cfg, ObjectStore(cfg.storage)


def emit(result: Any, path: Path | None) -> None:
    """Print the result as one JSON line on stdout (and to path): the step's machine output."""
    text = json.dumps(dataclasses.asdict(result), sort_keys=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)


def run_main(body: Callable[[], None], verbose: bool = False) -> int:
    """Run a command body: expected errors become one line on stderr and an exit code."""
    setup_logging(verbose)
    redeliver_interrupts()
    bound_retries()
    try:
        body()
    except (PipelineError, OSError) as exc:
        if (error := expected(exc)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        report(error)
        return error.exit_code
    except KeyboardInterrupt as exc:
        code, word = stopped_by(exc)
        print(word, file=sys.stderr)
        return code
    return 0


def step_main(
    step: Callable[[PipelineConfig, ObjectStore, argparse.Namespace], Any],
    module: str,
    doc: str | None,
    shortcuts: list[str],
    argv: list[str] | None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The container command of a step: parse flags, open the store, run, print the result."""
    parser = step_parser(f"python -m {module}", doc)
    if add_args is not None:
        add_args(parser)
    add_config_args(parser, shortcuts)
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = config_from_args(args)
        if args.result is not None:
            check_result(args.result)
        with open_store(cfg, module) as (live, store):
            emit(step(live, store, args), args.result)

    raise_on_sigterm()  # the embedded store's server stops with the step
    return run_main(body, args.verbose)
