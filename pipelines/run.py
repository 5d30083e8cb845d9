"""The pipeline CLI: `python pipelines/run.py [run|config|compile] ...` (run is the default)."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from pathlib import Path

# `python pipelines/run.py` puts pipelines/ first on sys.path; the packages live one level up.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines import state_lock  # noqa: E402
from pipelines.cli import (  # noqa: E402
    HelpFormatter,
    add_config_args,
    check_state_dir,
    config_from_args,
    run_main,
)
from pipelines.config import PipelineConfig  # noqa: E402
from pipelines.errors import ConfigError, PipelineError, expected, raise_on_sigterm  # noqa: E402
from pipelines.local import (  # noqa: E402
    STEPS,
    RunReport,
    check_before_run,
    check_resume,
    run_pipeline,
    stored_settings,
)
from pipelines.processes import OWNER_ENV, require_free, serve_until_stopped  # noqa: E402
from pipelines.report import as_json, summary  # noqa: E402
from training.resume import model_uri  # noqa: E402

log = logging.getLogger("mlops")

# Each command and its one-line help, for its parser and the list in the default --help.
COMMANDS = {
    "run": "run the pipeline on this machine (the default command)",
    "config": "print the resolved config as YAML",
    "compile": "write the Argo, KFP, PyTorchJob and InferenceService specs and config schema",
    "serve": "serve a trained model in the foreground",
    "mlflow-ui": "open the MLflow UI on the local state dir's runs",
    "submit": "submit the pipeline to Argo or KFP",
    "list": "list the pipeline's workflows",
    "status": "show a workflow's phase and steps",
    "logs": "print a workflow's logs",
    "stop": "stop a running workflow",
    "template": "manage the WorkflowTemplate",
}


def resumed_config(args: argparse.Namespace, cfg: PipelineConfig) -> PipelineConfig:
    """--resume's config: the run's own profile and settings, under a --config file and the
    flags given now (the trainer refuses a change to what its checkpoint holds)."""
    stored = stored_settings(cfg, args.resume)
    if stored is None:  # a run of an earlier version, which kept none: the flags say them
        return cfg
    if args.profile not in (None, stored["profile"]):
        raise ConfigError(
            f"--profile {args.profile}: {args.resume} is a {stored['profile']} run, and --resume "
            "goes on with its own settings; drop --profile"
        )
    given = argparse.Namespace(**vars(args))
    given.profile = stored["profile"]
    resumed = config_from_args(given, stored["set"])
    # The run's model and checkpoints are under its model name: settings that name another
    # (serving.model_name, the dataset) found none there, and trained from the start inside
    # the run's MLflow run, its checkpoints orphaned.
    bare = argparse.Namespace(profile=stored["profile"], config=None, set=[])
    own = config_from_args(bare, stored["set"])
    started = model_uri(own, args.resume)
    if model_uri(resumed, args.resume) != started:
        raise ConfigError(
            f"--resume {args.resume}: its model and checkpoints are under {started}, and the "
            f"settings given now put them under {model_uri(resumed, args.resume)}: resume "
            "without the settings that change the model name (serving.model_name, the dataset)"
        )
    source = resumed.dataset.source
    if source and source == own.dataset.source and not Path(source).expanduser().exists():
        # The run's own --data, since moved or cleaned away (a download in /tmp): the resume
        # was refused for it, though the store holds the data verify-data had put there.
        log.warning(
            "%s, the run's dataset.source, is gone: verify-data checks the stored copy against "
            "its manifest instead (pass --data PATH to check it against a source)",
            source,
        )
        dataset = resumed.dataset.model_copy(update={"source": None})
        resumed = resumed.model_copy(update={"dataset": dataset})
    return resumed


def print_refused(error: str, exit_code: int) -> None:
    """A run refused before it started: stdout still ends with the JSON object --json promises
    (it was empty, where a refusal after start-up gave one)."""
    print(as_json(RunReport(status="failed", error=error, exit_code=exit_code)), flush=True)


def checked_run(args: argparse.Namespace) -> RunReport:
    """The run the flags say, once its checks pass (each refusal a PipelineError)."""
    cfg = config_from_args(args)
    check_state_dir(cfg)
    # Held from the checks on (a port another run's server will take is free now) to the
    # run's end; not while --serve keeps the model server up, which reads its own folder.
    with state_lock.hold(cfg.state_dir, "run"):
        if args.resume:
            check_resume(cfg, args.resume)
            cfg = resumed_config(args, cfg)
        check_before_run(cfg)
        if args.serve:  # the server it leaves up ends with this process, even a SIGKILLed one
            os.environ[OWNER_ENV] = str(os.getpid())
        return run_pipeline(cfg, serve=args.serve, resume_id=args.resume)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        report = checked_run(args)
    except (PipelineError, OSError) as exc:
        if args.json and (error := expected(exc)) is not None:
            print_refused(str(error), error.exit_code)
        raise
    print(summary(report), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(as_json(report), flush=True)
    deployed = report.result("deploy")
    if deployed.get("serving"):
        serve_until_stopped(deployed["pid"], Path(deployed["model_dir"]))
    return report.exit_code


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.config import STORES, store_url

    cfg = config_from_args(args)
    doc = cfg.public_dict()
    # Null, not masked: a file made of this output reads back (read_yaml refuses credentials),
    # and the keys stay where they came from, the environment.
    doc["storage"].update(access_key=None, secret_key=None)
    # Unset where they are derived, so that a file made of this output follows what they
    # derive from (the dataset, the namespace); the comments say the values.
    derived = {"model_name": cfg.model_name}
    for key in STORES:
        if doc["cluster"][key] == store_url(key, cfg.cluster.namespace):
            derived[key], doc["cluster"][key] = doc["cluster"][key], None
    text = yaml.safe_dump(doc, sort_keys=False)
    for key, value in derived.items():
        unset = f"\n  {key}: null\n"
        text = text.replace(unset, f"{unset[:-1]}  # unset: {value}\n")
    print(text, end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Fetch a trained model from the store and serve it in the foreground until Ctrl-C."""
    import shutil

    from components.deploy import start_server
    from pipelines import registry
    from pipelines.cli import check_state_dir, open_store
    from pipelines.errors import PipelineError
    from pipelines.processes import HOST, server_log
    from pipelines.storage import parse_s3_uri
    from serving.launch import download_model, local_model_dir, model_meta, served_as

    cfg = config_from_args(args)
    if cfg.state_dir.exists() and not cfg.state_dir.is_dir():  # said so, before the lookup
        check_state_dir(cfg)
    uri = registry.champion_uri(cfg) if args.model_uri is None else args.model_uri
    registered = registry.MODELS_URI.fullmatch(uri) is not None
    if not registered:
        try:
            parse_s3_uri(uri)
        except PipelineError as exc:
            nor = (
                ""
                if uri.startswith("s3://")
                else ", nor models:/NAME@ALIAS or models:/NAME/VERSION"
            )
            raise ConfigError(f"--model-uri: {exc}{nor}") from None
    # Before the store starts: sqlite lets a reader beside a run's server that writes.
    model_uri, version = registry.resolve(cfg, uri) if registered else (uri, "")
    require_free(cfg.serving.port, "serving.port")  # before the download, not after
    with open_store(cfg, "serve") as (_, store):
        meta = model_meta(store, model_uri)
        cfg = served_as(cfg, meta)
        model_dir = local_model_dir(cfg)
        shutil.rmtree(model_dir, ignore_errors=True)
        download_model(store, model_uri, model_dir, meta)
    name, port = cfg.model_name, cfg.serving.port
    os.environ[OWNER_ENV] = str(os.getpid())  # as for run --serve
    proc = start_server(model_dir, name, port, cfg, server_log(model_dir))
    print(
        f"serving {model_uri}{f' ({version}, {uri})' if version else ''}\n"
        f"  V1 http://{HOST}:{port}/v1/models/{name}:predict\n"
        f"  V2 http://{HOST}:{port}/v2/models/{name}/infer\n(Ctrl-C to stop)",
        flush=True,
    )
    serve_until_stopped(proc.pid, model_dir)
    return 0


def job_config(args: argparse.Namespace) -> PipelineConfig:
    """The config of a job for the cluster, checked as its pods will check it: a batch that
    does not split over the ranks failed the trainer after the data steps had run there."""
    from components.train import check_ranks
    from pipelines.config import for_cluster

    cfg = config_from_args(args, cluster=True)
    if cfg.dataset.source:
        # A path of this machine: the pods have no such file, and verify-data failed there
        # once the workflow had started. The data goes into the cluster's store beforehand.
        raise ConfigError(
            f"dataset.source={cfg.dataset.source!r} is a path on this machine, which the "
            "cluster's pods cannot read: upload it into the cluster's store with "
            "`python -m components.verify_data --data PATH` (README, Run on Kubernetes), then "
            "submit without dataset.source"
        )
    check_ranks(for_cluster(cfg))
    return cfg


def _argo(args: argparse.Namespace, cfg: PipelineConfig | None = None):
    """The config (the flags', unless given: a job's, checked) and a client of the server."""
    from pipelines.submit import ArgoClient, ArgoTarget

    cfg = cfg or config_from_args(args, cluster=True)
    return cfg, ArgoClient(
        ArgoTarget.resolve(
            args.argo_server,
            args.argo_token,
            cfg,
            args.insecure_skip_tls_verify,
        )
    )


def cmd_submit(args: argparse.Namespace) -> int:
    if args.backend == "kfp":
        import tempfile

        from kfp import compiler

        from components.train import new_run_id
        from pipelines.kfp_pipeline import build_pipeline
        from pipelines.submit import submit_kfp

        cfg = job_config(args)
        with tempfile.TemporaryDirectory() as tmp:
            ir = Path(tmp) / "kfp-pipeline.yaml"
            compiler.Compiler().compile(build_pipeline(cfg), str(ir))
            insecure = args.insecure_skip_tls_verify
            run = submit_kfp(cfg, args.kfp_host, ir, new_run_id(), insecure, args.kfp_token)
            print(f"submitted KFP run {run}")
        return 0
    cfg, client = _argo(args, job_config(args))  # checked before any request
    from pipelines.argo import PARAMETERS, config_value

    # Config flags given on the command line become the workflow's UI parameters.
    parameters = {
        # The checked value, not the text typed: `--epochs 010` is 10 here, as in the pods.
        name: "" if (value := config_value(cfg, key)) is None else str(value)
        for name, key in PARAMETERS
        if getattr(args, f"cfg:{key}", None) is not None
    }
    name = client.submit(cfg, parameters)
    print(f"submitted {name} to {client.target.url} (namespace {client.target.namespace})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, client = _argo(args)
    rows = client.list()
    print(f"{'NAME':<40}{'PHASE':<12}STARTED")
    for row in rows:
        print(f"{row['name']:<40}{row['phase']:<12}{row['started']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _, client = _argo(args)
    status = client.status(args.run)
    print(f"{status['name']}: {status['phase']} {status['message']}".rstrip())
    for step, phase in status["steps"].items():
        print(f"  {step:<24}{phase}")
    return 1 if status["phase"] in ("Failed", "Error") else 0  # Error: Argo's own failure


def cmd_logs(args: argparse.Namespace) -> int:
    _, client = _argo(args)
    for line in client.logs(args.run, args.step):
        print(line)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    _, client = _argo(args)
    print(f"{args.run}: {client.stop(args.run)}")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    cfg, client = _argo(args, job_config(args))  # checked before any request, as submit
    name = client.create_template(cfg)
    print(
        f"WorkflowTemplate {name} installed in {client.target.namespace}: submit it from the "
        "Argo UI, or with `python pipelines/run.py submit`"
    )
    return 0


def _argo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--argo-server", metavar="URL", help="Argo Server URL (default: $ARGO_SERVER)"
    )
    parser.add_argument(
        "--argo-token",
        metavar="TOKEN",
        help="bearer token (default: $ARGO_TOKEN; prefer the variable)",
    )
    parser.add_argument(
        "-k",
        "--insecure-skip-tls-verify",
        action="store_true",
        help="accept the server's self-signed certificate, e.g. through kubectl port-forward "
        "(default: verify; for Argo also $ARGO_INSECURE_SKIP_VERIFY=true; with submit "
        "--backend kfp, the KFP API server's)",
    )


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    """The MLflow UI over the state dir's runs, until Ctrl-C."""
    import time

    from pipelines.cli import open_store
    from pipelines.mlflow_server import LocalMlflow, local_workdir

    cfg = config_from_args(args)
    port = cfg.mlflow.ui_port
    # Else the server fails to bind and exits, and only its log says why.
    require_free(port, "mlflow.ui_port", "pass --set mlflow.ui_port=N (another MLflow UI?)")
    check_state_dir(cfg)
    # The state dir's, whatever the store: a store of the user's (MINIO_ENDPOINT) took no
    # lock, and the UI's server then started on the database of a run in progress.
    with state_lock.hold(cfg.state_dir, "mlflow-ui"), open_store(cfg, "mlflow-ui") as (live, store):
        store.ensure_buckets()
        server = LocalMlflow(live, local_workdir(live.state_dir), port).start()
        try:
            print(f"MLflow UI: {server.wait()}  (Ctrl-C to stop)", flush=True)
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(1)
        finally:
            server.stop()
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.cli import make_dir
    from pipelines.compile import write_all

    cfg = job_config(args)
    make_dir(args.out, "--out", "pass --out DIR")  # a bad path: one line, before any work
    for path in write_all(cfg, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipelines/run.py",
        description="Run the image-classifier pipeline: " + " >> ".join(STEPS),
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def add(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=COMMANDS[name], formatter_class=HelpFormatter)

    run = sub.add_parser(
        "run",
        help=COMMANDS["run"],
        formatter_class=HelpFormatter,
        description=f"{parser.description}\n\ncommands (`python pipelines/run.py COMMAND "
        "--help` shows each one's options; run's are below):\n"
        + "\n".join(f"  {name:<11}{doc}" for name, doc in COMMANDS.items()),
    )
    add_config_args(run, ["--dataset", "--data", "--epochs", "--workers", "--port", "--state-dir"])
    run.add_argument(
        "--serve",
        action="store_true",
        help="keep the model server running after the run, until Ctrl-C "
        "(default: smoke-test it, then stop it)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object as the last line of stdout (default: off)",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue an earlier run of this state dir that did not complete (its summary "
        "names it), from its last checkpoint, with its profile and settings (kept in "
        "runs/RUN_ID/settings.json as the run started; a --config file and flags given now "
        "override them for this attempt): the "
        "data steps find their outputs, training goes on in the same MLflow run (default: a "
        "new run)",
    )
    run.set_defaults(func=cmd_run)
    config = add("config")
    add_config_args(config, ["--dataset", "--data", "--epochs", "--workers", "--state-dir"])
    config.set_defaults(func=cmd_config)
    serve = add("serve")
    serve.add_argument(
        "--model-uri",
        metavar="URI",
        help="the model to serve: s3://models/NAME/RUN/ (a run's summary names it), or a "
        "registered version, models:/NAME@ALIAS or models:/NAME/VERSION, looked up in "
        "mlflow.tracking_uri's registry, else the state dir's; it is served under the name it "
        "was trained under, unless serving.model_name is set (default: the version the gate "
        "put in service, models:/MODEL_NAME@champion: the model name follows --dataset as in "
        "a run, the alias is gate.alias)",
    )
    add_config_args(serve, ["--dataset", "--port", "--state-dir"])
    serve.set_defaults(func=cmd_serve)
    submit = add("submit")
    submit.add_argument(
        "--backend", choices=["argo", "kfp"], default="argo", help="where to submit (default: argo)"
    )
    submit.add_argument("--kfp-host", metavar="URL", help="KFP API server (default: $KFP_HOST)")
    submit.add_argument(
        "--kfp-token",
        metavar="TOKEN",
        help="bearer token for a KFP API server behind a login (default: $KFP_TOKEN; prefer "
        "the variable)",
    )
    _argo_flags(submit)
    add_config_args(submit, ["--dataset", "--epochs", "--workers", "--namespace"])
    submit.set_defaults(func=cmd_submit)
    for name, func in (
        ("list", cmd_list),
        ("status", cmd_status),
        ("logs", cmd_logs),
        ("stop", cmd_stop),
    ):
        cmd = add(name)
        if name != "list":
            cmd.add_argument("run", help="the workflow's name (see `list`)")
        if name == "logs":
            cmd.add_argument(
                "--step",
                choices=list(STEPS),
                help="only this step's pods, the trainer's with train (default: every step)",
            )
        _argo_flags(cmd)
        add_config_args(cmd, ["--namespace"])
        cmd.set_defaults(func=func)
    template = add("template")
    template.add_argument(
        "action", choices=["create"], help="create (or update) it, for submission from the Argo UI"
    )
    _argo_flags(template)
    add_config_args(template, ["--workers", "--namespace"])
    template.set_defaults(func=cmd_template)
    ui = add("mlflow-ui")
    add_config_args(ui, ["--state-dir"])
    ui.set_defaults(func=cmd_mlflow_ui)
    comp = add("compile")
    comp.add_argument(
        "--out", type=Path, default=Path("build"), help="output folder (default: build)"
    )
    add_config_args(comp, ["--workers", "--namespace"])
    comp.set_defaults(func=cmd_compile)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line. With `run --json`, a usage error also ends stdout with the JSON
    object --json promises (argparse's message, which it writes to stderr, is its error)."""
    if argv[0] != "run" or "--json" not in argv:
        return build_parser().parse_args(argv)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == ConfigError.exit_code:
            error = said.getvalue().strip().splitlines()[-1].partition("error: ")[2]
            print_refused(error, ConfigError.exit_code)
        raise
    finally:
        sys.stderr.write(said.getvalue())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `run` is the default command, so plain --help shows its options.
    if not argv or argv[0] not in COMMANDS:
        argv = ["run", *argv]
    args = parse_args(argv)
    code = 0
    # The local commands start S3, MLflow and model servers: a SIGTERM stops them as Ctrl-C
    # does, instead of ending this process alone and leaving them running on the state dir.
    raise_on_sigterm()

    def body() -> None:
        nonlocal code
        code = args.func(args)

    failure = run_main(body, args.verbose)
    return failure or code


if __name__ == "__main__":
    sys.exit(main())
