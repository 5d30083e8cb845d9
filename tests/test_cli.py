"""The commands as a user runs them: help, exit codes, one-line errors, JSON output, re-runs."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from components.train import tracking_ready
from data import synthetic
from pipelines.cli import check_state_dir
from pipelines.config import TrainConfig, load_config
from pipelines.errors import REPORT_ENV, ConfigError, reported
from pipelines.launcher import run_single, run_torchrun
from pipelines.local import QuietKfp
from pipelines.mlflow_runs import fail_abandoned, fail_left_running
from pipelines.processes import HOST, free_port
from pipelines.s3server import EmbeddedS3
from training.precision import cuda_available

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("run", "config", "compile", "serve", "mlflow-ui", "submit", "list", "status", "logs")
COMMANDS += ("stop", "template")


def run(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "MLFLOW_"))}
    return subprocess.run(
        [*prefix, sys.executable, *args],
        check=False,
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["pipelines/run.py", "--help"],
        ["pipelines/run.py", "run", "--help"],
        ["-m", "components.verify_data", "--help"],
        ["-m", "components.feature_engineering", "--help"],
    ],
)
def test_help_explains_every_option_with_its_default(command: list[str]) -> None:
    out = run(*command)
    assert out.returncode == 0, out.stderr
    if command == ["pipelines/run.py", "--help"]:  # the default: run's help, and every command
        for name in COMMANDS:
            assert f"\n  {name} " in out.stdout, f"{name} is not listed"
    assert "--profile" in out.stdout and "(default: quick)" in out.stdout
    epochs = TrainConfig.model_fields["epochs"].default
    # the config keys, generated from the tree
    assert f"train.epochs (default {epochs})" in out.stdout
    assert "--dataset {cifar10,mnist,imagefolder,synthetic}" in out.stdout


def test_config_prints_a_file_that_reads_back(tmp_path: Path) -> None:
    """`config` prints the resolved tree; the model name stays unset (so a file made of it
    follows a dataset changed in it), with the name it resolves to as a comment. Keys in the
    environment print as null: masked, they were credentials the file could not be read with."""
    keys = {"MINIO_ACCESS_KEY": "the-access-key", "MINIO_SECRET_KEY": "the-secret-key"}
    out = run("pipelines/run.py", "config", "--dataset", "mnist", "--epochs", "3", env=keys)
    assert out.returncode == 0, out.stderr
    assert "\n  model_name: null  # unset: mnist-resnet18\n" in out.stdout
    assert "\n  access_key: null\n  secret_key: null\n" in out.stdout
    assert "the-secret-key" not in out.stdout
    saved = tmp_path / "mine.yaml"
    saved.write_text(out.stdout.replace("name: mnist", "name: synthetic"))
    again = run("pipelines/run.py", "config", "--config", str(saved), env=keys)
    assert again.returncode == 0, again.stderr
    assert "epochs: 3\n" in again.stdout
    assert "# unset: synthetic-resnet18" in again.stdout
    # The stores' in-cluster URLs stay unset too: they follow a namespace set later, which a
    # printed URL pinned to mlops's stores.
    assert "\n  s3_endpoint: null  # unset: http://minio.mlops.svc.cluster.local:9000\n" in (
        out.stdout
    )
    team = run(
        "pipelines/run.py", "config", "--config", str(saved), "--set", "cluster.namespace=team-a",
        env=keys,
    )  # fmt: skip
    assert "# unset: http://mlflow.team-a.svc.cluster.local:5000\n" in team.stdout
    # And the cluster commands read such a file: KServe's import took --config for its own
    # --configure_logging, a usage error.
    compiled = run(
        "pipelines/run.py", "compile", "--config", str(saved), "--out", str(tmp_path / "out")
    )
    assert compiled.returncode == 0, compiled.stderr


def test_the_driver_starts_without_torch() -> None:
    # Importing torch takes 1.2 s and more on 2 busy cores: the driver starts the fork server
    # and S3 first, and torch is imported in the fork server beside the data steps. A module
    # the driver imports that pulls torch in (as training.checkpoint once did) delays it all.
    out = run("-c", "import sys; import pipelines.run; print('torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "the driver imported torch"


def test_verbose_reaches_every_process_the_command_starts() -> None:
    """-v set the driver's level only: the steps and the trainer took no -v, and logged at
    INFO whatever the driver was asked."""
    code = (
        "import logging, os, subprocess, sys; from pipelines.console import setup_logging\n"
        "setup_logging(sys.argv[1] == 'v'); print(logging.getLogger().level)\n"
        "child = 'from pipelines.console import setup_logging; import logging\\n'\n"
        "child += 'setup_logging(); print(logging.getLogger().level)'\n"
        "subprocess.run([sys.executable, '-c', child], check=True)\n"
    )
    assert run("-c", code, "v").stdout.split() == ["10", "10"]  # DEBUG, in its child too
    assert run("-c", code, "-").stdout.split() == ["20", "20"]


def test_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    out = run("pipelines/run.py", "--set", "train.lr=-1", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == "error: train.lr=-1: Input should be greater than 0"
    # With --json, stdout ends with the JSON object, a refusal before the run too (it was
    # empty, where a refusal after start-up gave one).
    out = run("pipelines/run.py", "--json", "--set", "train.lr=-1", "--state-dir", str(tmp_path))
    refused = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 2 and refused["status"] == "failed" and refused["steps"] == []
    assert refused["error"] == "train.lr=-1: Input should be greater than 0"
    out = run("pipelines/run.py", "--json", "--profile", "nope", "--state-dir", str(tmp_path))
    refused = json.loads(out.stdout.strip().splitlines()[-1])  # argparse's refusal too
    assert out.returncode == 2 and refused["error"].startswith("argument --profile: invalid")
    assert "usage: python pipelines/run.py run" in out.stderr
    out = run("-m", "components.verify_data", "--set", "nonsense")
    assert out.returncode == 2 and "expected KEY=VALUE" in out.stderr
    assert "Traceback" not in out.stderr


def test_compile_refuses_an_out_path_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = run("pipelines/run.py", "compile", "--out", str(tmp_path / "file"))
    assert out.returncode == 2
    assert out.stderr == f"error: --out: {tmp_path}/file is a file, not a folder; pass --out DIR\n"


def test_compile_writes_every_spec_or_none(tmp_path: Path) -> None:
    """A spec's name taken by a folder was a traceback, after the specs before it were written."""
    (tmp_path / "kfp-pipeline.yaml").mkdir()
    out = run("pipelines/run.py", "compile", "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == (
        f"error: --out: {tmp_path}/kfp-pipeline.yaml is a folder; remove it, or pass another "
        "--out DIR\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["kfp-pipeline.yaml"]


def test_compile_leaves_this_machines_store_and_tracking_variables_out(tmp_path: Path) -> None:
    """MINIO_REGION went into every pod's arguments, so `make compile` in such a shell rewrote
    the committed specs; an MLFLOW_TRACKING_URI no pod sees failed the command."""
    env = {"MINIO_REGION": "eu-west-1", "MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}
    out = run("pipelines/run.py", "compile", "--out", str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    golden = ROOT / "pipelines" / "compiled"
    for path in sorted(golden.iterdir()):
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


def driver_lines(output: str) -> str:
    """A run's output less its trainer's lines ([rank0] ...)."""
    return "\n".join(x for x in output.splitlines() if not x.lstrip().startswith("["))


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["pipelines/run.py", "config", "--config", "{tmp}"], {}, "config file {tmp} is a folder"),
        (["pipelines/run.py", "config", "--config", "{tmp}/bin"], {}, "{tmp}/bin is not UTF-8"),
        (["pipelines/run.py", "--state-dir", "{tmp}/file"], {}, "state_dir: {tmp}/file is a file"),
        # It looked for a registry there first: "no model registry in ...", exit 1.
        (["pipelines/run.py", "serve", "--state-dir", "{tmp}/file"], {}, "{tmp}/file is a file"),
        (
            ["pipelines/run.py", "serve", "--model-uri", "not-a-uri"],
            {},
            "--model-uri: 'not-a-uri' is not an s3://bucket/key URI, nor models:/NAME@ALIAS",
        ),
        (["pipelines/run.py", "serve", "--model-uri", ""], {}, "--model-uri: '' is not an s3://"),
        # The S3 client refused it with a ValueError: a traceback.
        (
            ["pipelines/run.py", "serve", "--model-uri", "s3://models/a/../b/"],
            {},
            "--model-uri: 's3://models/a/../b/': a '.' or '..' segment names no folder in S3",
        ),
        (
            ["pipelines/run.py", "serve", "--model-uri", "models:/m/99999999999999999999"],
            {},
            "'models:/m/99999999999999999999' is not an s3://bucket/key URI, nor models:/NAME@",
        ),
        (
            ["pipelines/run.py", "serve", "--model-uri", "models:/m/Production"],
            {},
            "'models:/m/Production' is not an s3://bucket/key URI, nor models:/NAME@ALIAS or",
        ),
        (
            ["-m", "components.verify_data", "--result", "{tmp}/file/r.json"],
            {},
            "--result {tmp}/file/r.json: {tmp}/file is a file, not a folder",
        ),
        (
            ["-m", "components.verify_data"],
            {"MINIO_ENDPOINT": "http://127.0.0.1:9"},
            "storage.endpoint=http://127.0.0.1:9 needs credentials: set MINIO_ACCESS_KEY",
        ),
        (["pipelines/run.py", "--set", "train.precision=fp16"], {}, "fp16 needs CUDA"),
        (
            ["pipelines/run.py", "--set", "runtime=kubernetes"],
            {},
            "runtime=kubernetes trains and serves in the cluster, whose pods cannot reach",
        ),
        (
            ["pipelines/run.py", "--dataset", "imagefolder", "--data", "{tmp}/none.zip"],
            {},
            "dataset.source='{tmp}/none.zip': no such file or folder",
        ),
        (
            ["pipelines/run.py", "--workers", "3"],
            {},
            "batch_size=256 must be a multiple of 3 ranks, which each take an equal share of the "
            "batch: set train.batch_size to 255 or 258, or train on a number of ranks that divides",
        ),
        # A BatchNorm error mid-run, once per restart, with a traceback each time.
        (
            ["pipelines/run.py", "--workers", "2", "--set", "train.batch_size=2"],
            {},
            "train.batch_size=2 gives each of 2 rank(s) one image a step, and BatchNorm needs at "
            "least 2: set train.batch_size to 4 or more",
        ),
        (["pipelines/run.py", "--port", "{port}"], {}, "serving.port={port}: the port is in use"),
        (
            ["pipelines/run.py", "mlflow-ui", "--set", "mlflow.ui_port={port}"],
            {},
            "mlflow.ui_port={port}: the port is in use",
        ),
    ],
)
def test_what_is_known_up_front_fails_before_any_work(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path, held_port: int
) -> None:
    """Bad paths, missing keys, a precision or a batch this machine cannot train, and taken
    ports: one line and exit 2 before any service or step starts, not a traceback or a
    failure after the data steps."""
    if "fp16" in message and cuda_available():
        pytest.skip("this machine trains fp16")
    (tmp_path / "file").write_text("")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00\x01")
    state = tmp_path / "state"
    fill = {"tmp": str(tmp_path), "port": str(held_port)}
    args = [a.format(**fill) for a in args]
    out = run(*args, *([] if "--state-dir" in args else ["--state-dir", str(state)]), env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert message.format(**fill) in out.stderr
    assert not (state / "s3").exists()  # no embedded store started, so no step either


@pytest.mark.parametrize("step", ["components.deploy", "components.verify_model"])
def test_a_model_uri_that_is_no_s3_uri_is_a_usage_error(step: str, tmp_path: Path) -> None:
    """deploy failed at its first download (exit 1), naming 'foo/' and not the option."""
    out = run("-m", step, "--model-uri", "foo", "--state-dir", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.endswith(
        "error: argument --model-uri: 'foo' is not an s3://BUCKET/KEY/ URI\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "components.train", "--processed", "foo"], "--processed: 'foo' is not an s3://"),
        (
            ["-m", "components.train", "--processed", "s3://processed-data/a/../b/"],
            "--processed: 's3://processed-data/a/../b/': a '.' or '..' segment",
        ),
        (
            ["-m", "components.train", "--processed", "s3://processed-data/a/", "--run-id", "../x"],
            "--run-id: '../x' is not a run id",
        ),
        (["-m", "components.verify_model", "--run-id", "a/b"], "--run-id: 'a/b' is not a run id"),
        (
            ["-m", "components.deploy", "--model-uri", "s3://models/a/./b/"],
            "--model-uri: 's3://models/a/./b/': a '.' or '..' segment",
        ),
        (
            ["-m", "components.deploy", "--model-uri", "s3://ab/x/"],
            "--model-uri: 's3://ab/x/': invalid bucket name ab",
        ),
    ],
)
def test_a_step_option_that_names_no_object_is_a_usage_error(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """A '.' or '..' in a URI or a run id was the S3 client's ValueError, a traceback (exit 1);
    --processed that is no URI failed once the store had started."""
    out = run(*args, "--state-dir", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: argument {message}" in out.stderr


def test_a_port_it_may_not_bind_is_not_called_in_use(tmp_path: Path) -> None:
    """Every bind failure was "the port is in use": a port below 1024 too, which this process
    may not bind (root here, so run without that capability)."""
    drop = ("setpriv", "--bounding-set", "-net_bind_service") if os.geteuid() == 0 else ()
    out = run("pipelines/run.py", "--port", "1", "--state-dir", str(tmp_path / "s"), prefix=drop)
    assert out.returncode == 2
    assert (
        out.stderr == "error: serving.port=1: cannot listen on it (Permission denied); pass "
        "--port N\n"
    )


def test_a_new_state_dir_is_its_owners_only(tmp_path: Path) -> None:
    """It holds the embedded store's objects and MLflow's database as files: 0755, as the
    umask left it, let every user of the machine read the datasets, models and runs that the
    servers guard with per-run keys. A folder that exists is left as it is."""
    os.umask(old := os.umask(0o022))
    new, existing = tmp_path / "a" / "state", tmp_path / "existing"
    existing.mkdir(mode=0o755)
    for path in (new, existing):
        check_state_dir(load_config(environ={"MLOPS_STATE_DIR": str(path)}))
    assert stat.S_IMODE(new.stat().st_mode) == 0o700 & ~old
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755 & ~old


def test_a_state_dir_in_use_refuses_a_second_command_until_its_holder_dies(
    tmp_path: Path,
) -> None:
    """Two commands' S3 servers on one data folder, or two runs' MLflow servers and KFP
    workspaces, would corrupt each other: the second is refused (exit 2) and told who holds
    the state dir. The lock dies with its holder, even by SIGKILL."""
    state = tmp_path / "state"
    state.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipelines import state_lock\n"
            "with state_lock.hold(Path(sys.argv[1]), 'run'):\n"
            "    state_lock.note(Path(sys.argv[1]), mlflow='http://127.0.0.1:5999')\n"
            "    print('held', flush=True); time.sleep(300)",
            str(state),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        # `mlflow-ui` with a store of the user's took no lock, and failed a live run's MLflow
        # run as left RUNNING (its store is not reached: the lock refuses it first).
        users_store = {"MINIO_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
        users_store |= {"MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"}
        for command, env in (
            (["pipelines/run.py", "--dataset", "synthetic", "--profile", "smoke"], None),
            (["-m", "components.verify_data", "--dataset", "synthetic"], None),  # embedded store
            (
                ["pipelines/run.py", "mlflow-ui", "--set", f"mlflow.ui_port={free_port()}"],
                users_store,
            ),
        ):
            out = run(*command, "--state-dir", str(state), env=env)
            assert out.returncode == 2, out.stderr
            assert out.stderr == (
                f"error: state_dir {state} is in use by `run` (pid {holder.pid}, since "
                f"{json.loads((state / 'lock').read_text())['since']}), whose MLflow UI is "
                "http://127.0.0.1:5999; wait for it to end, or pass --state-dir DIR\n"
            )
        assert not (state / "s3").exists()  # refused before its store started
    finally:
        holder.kill()
        holder.wait()
    from pipelines import state_lock

    with state_lock.hold(state, "test"), state_lock.hold(state, "the same process again"):
        assert json.loads((state / "lock").read_text())["pid"] == os.getpid()


def test_a_trainer_config_error_ends_the_train_step_at_once(tmp_path: Path) -> None:
    """A trainer that exits 2 is not restarted, it reports its error for the step, and the wait
    for an unreachable tracking server ends with the trainer instead of after mlflow.wait_s."""
    trainer = [
        "-c",
        "import sys; from pipelines.cli import run_main; from pipelines.errors import ConfigError\n"
        "def body(): raise ConfigError('train.x=1: bad')\n"
        "sys.exit(run_main(body))",
    ]
    error_report = tmp_path / "error.json"
    env = dict(os.environ, **{REPORT_ENV: str(error_report)})
    ready = tracking_ready(f"http://{HOST}:{free_port()}", wait_s=600)
    start = time.monotonic()
    code, attempts = run_single(trainer, env, 2, tmp_path, ready)
    assert (code, attempts) == (2, 1)
    error = reported(error_report)
    assert isinstance(error, ConfigError) and str(error) == "train.x=1: bad"
    # Not a timing: a liveness bound. Unwatched, the wait would have lasted its 600 s.
    assert time.monotonic() - start < 300


def test_the_wait_for_the_runs_mlflow_server_ends_when_it_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's own server died (a database it refused, say): the train step's wait ends at
    once and points to the server's log, not to MLFLOW_TRACKING_URI after mlflow.wait_s."""
    from pipelines.errors import PipelineError
    from pipelines.mlflow_server import LOCAL_SERVER_ENV

    server = subprocess.Popen([sys.executable, "-c", "pass"])  # dead at once, a zombie
    log_path = tmp_path / "server.log"
    monkeypatch.setenv(LOCAL_SERVER_ENV, f"{server.pid}:{log_path}")
    uri = f"http://{HOST}:{free_port()}"
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = time.monotonic()
        with pytest.raises(PipelineError) as failed:
            tracking_ready(uri, wait_s=600)(trainer)  # type: ignore[arg-type]
        assert str(failed.value) == f"the MLflow server at {uri} exited: see {log_path}"
        assert time.monotonic() - start < 300  # a liveness bound, not a timing
    finally:
        trainer.kill()
        trainer.wait()
        server.wait()


def test_an_interrupted_step_records_it_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C reaches every process of the run: a step says "interrupted", as the driver
    does, and its record tells the driver why it ended, instead of a traceback and no record."""
    from pipelines import steps
    from pipelines.config import load_config, public_json

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(steps.STEPS, "verify-data", interrupted)
    for var, value in (
        ("ENDPOINT", "http://127.0.0.1:9"),
        ("ACCESS_KEY", "a"),
        ("SECRET_KEY", "b"),
    ):
        monkeypatch.setenv(f"MINIO_{var}", value)
    cfg = load_config("smoke", overrides={"state_dir": str(tmp_path)}, environ={})
    with pytest.raises(SystemExit) as exited:
        steps.run_step("verify-data", public_json(cfg), str(tmp_path / "run"))
    assert exited.value.code == 130
    record = json.loads(steps.record_path(tmp_path / "run", "verify-data").read_text())
    assert (record["status"], record["error"], record["exit_code"]) == (
        "failed",
        "interrupted",
        130,
    )
    assert capsys.readouterr().err.endswith("error: interrupted\n")


def stops_as_interrupted(head: str) -> None:
    """`head` defines body(); it runs under run_main and must end as a Ctrl-C, not go on."""
    out = run("-c", head + "    time.sleep(30)\n    print('went on')\nsys.exit(run_main(body))\n")
    assert (out.returncode, out.stdout, out.stderr) == (130, "", "interrupted\n")


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_command() -> None:
    """Python reports an exception raised in a __del__ as 'Exception ignored', with a
    traceback, and goes on: a Ctrl-C that arrived there (in CI, in minio's client finalizer
    inside the trainer) was lost. It is delivered again, and the command stops as it should."""
    body = (
        "import signal, sys, time\n"
        "from pipelines.cli import run_main\n"
        # As the fork server's children have it, even where a background shell ignores SIGINT.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt  # as a Ctrl-C that lands in a finalizer\n"
        "def body():\n"
        "    Finalized()  # collected at once\n"
    )
    stops_as_interrupted(body)


def test_a_full_disk_or_a_file_it_may_not_write_is_one_line_naming_it() -> None:
    """A state dir on a full disk failed the step with a traceback (ENOSPC from writing the
    generated data's cache). /dev/full answers every write with ENOSPC, and sysfs refuses to
    make a file even to root."""
    body = (
        "import sys\n"
        "from pipelines.cli import run_main\n"
        "def body():\n"
        "    with open('/dev/full', 'wb', buffering=0) as f:\n"
        "        f.write(b'x')\n"
        "sys.exit(run_main(body))\n"
    )
    out = run("-c", body)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: no space left on the device: free some space, or pass")
    from pipelines.errors import disk_full

    full = disk_full(OSError(28, "No space left on device", "/state/cache/x.tar.gz"))
    assert full is not None and "writing /state/cache/x.tar.gz" in str(full)
    assert disk_full(OSError(13, "Permission denied", "/x")) is None  # not this one's
    # A file this user may not write (a folder a `sudo` run left in the state dir, a
    # read-only mount): a traceback from the driver or the step, before.
    out = run("-c", body.replace("/dev/full", "/sys/mlops-test"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: no access to /sys/mlops-test (Permission denied): fix")


def test_a_sigterm_right_after_a_ctrl_c_does_not_cut_its_clean_up_short() -> None:
    """On a Ctrl-C the train step terminates its trainer, which took the Ctrl-C too: with both
    pending after a long C call (a forward pass), the SIGTERM landed in run_main's `except
    KeyboardInterrupt` and escaped as a traceback, exit 1."""
    body = (
        "import os, signal, sys, time\n"
        "from pipelines.cli import run_main\n"
        "from pipelines.errors import raise_on_sigterm\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "raise_on_sigterm()\n"
        "both = {signal.SIGINT, signal.SIGTERM}\n"
        "def body():\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, both)  # as inside one long C call\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)\n"
    )
    stops_as_interrupted(body)


def test_a_second_sigterm_does_not_cut_the_first_ones_clean_up_short() -> None:
    """A stopped trainer gets two SIGTERMs, the fork server's and then its step's. The second
    landed now and then after run_main had handled the first, in the finally that closes the
    MLflow run, and escaped as a traceback. It is ignored while the first unwinds; one lost
    in a finalizer is raised again, so that the command still stops."""
    body = (
        "import os, signal, sys, time\n"
        "from pipelines.cli import run_main\n"
        "from pipelines.errors import raise_on_sigterm\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # lands in this finalizer, and is lost\n"
        "def body():\n"
        "    Finalized()\n"
        "    time.sleep(30)\n"
        "    print('went on')\n"
        "raise_on_sigterm(lambda: print('first'))\n"
        "try:\n"
        "    code = run_main(body)\n"
        "finally:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # the second stop, as the run closes\n"
        "    time.sleep(0.2)\n"
        "    print('closed')\n"
        "sys.exit(code)\n"
    )
    out = run("-c", body)
    assert (out.returncode, out.stdout, out.stderr) == (
        143,
        "first\nfirst\nclosed\n",
        "terminated\n",
    )


def test_a_command_outlives_the_reader_of_its_output(tmp_path: Path) -> None:
    """A stopped step closes the pipe its trainer writes to while the trainer closes its
    MLflow run, and MLflow's end_run prints to stdout before it sends the status: the
    BrokenPipeError left the run RUNNING (5 stops of 6 here). Output to a reader that has
    gone is dropped; the command goes on to its end."""
    done = tmp_path / "done"
    body = (
        "import logging, sys\n"
        "from pipelines.cli import run_main\n"
        "def body():\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()  # until the reader has gone\n"
        "    for _ in range(3):\n"
        "        print('x' * 100_000, flush=True)\n"
        "        logging.getLogger('mlops').info('y' * 100_000)\n"
        f"    open({str(done)!r}, 'w').write('done')\n"
        "sys.exit(run_main(body))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", body],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.stdout.close()
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert done.read_text() == "done"


def test_a_step_interrupted_under_a_driver_that_went_on_reads_as_interrupted(
    tmp_path: Path,
) -> None:
    """Where kfp.local, not the driver, took the Ctrl-C, the run ends as a failed task: the
    step's record still makes it 'interrupted' (exit 130) in the report, and resumable."""
    from pipelines.local import RunReport, StepReport, collect
    from pipelines.report import summary
    from pipelines.steps import STEPS, record_path

    records = {
        "verify-data": {"status": "succeeded", "seconds": 1.0, "result": {}},
        "train": {"status": "failed", "seconds": 9.0, "error": "interrupted", "exit_code": 130},
    }
    for step, record in records.items():
        record_path(tmp_path, step).parent.mkdir(exist_ok=True)
        record_path(tmp_path, step).write_text(json.dumps(record))
    record_path(tmp_path, "feature-engineering").write_text(json.dumps(records["verify-data"]))
    report = RunReport(run_id="run-20260101-000000-abcd", steps=[StepReport(s) for s in STEPS])
    collect(report, tmp_path)
    statuses = [s.status for s in report.steps]
    assert statuses == ["succeeded", "succeeded", "interrupted", "skipped", "skipped"]
    assert (report.failed_step, report.error, report.exit_code) == ("train", "interrupted", 130)
    assert "--resume run-20260101-000000-abcd" in summary(report)
    # A deploy that failed resumes from the gate, a port taken meanwhile included (a config
    # error, exit 2, which gave no line: the resume takes --port); a refused gate would judge
    # the same model again, and a config error in training would fail again: no line.
    # A gate stopped before its verdict goes on from the gate: it offered nothing, and a user
    # trained from the start.
    for step, code, offered in (
        ("deploy", 1, True),
        ("verify-model", 1, False),
        ("verify-model", 130, True),
        ("verify-model", 143, True),
        ("deploy", 2, True),
        ("train", 2, False),
    ):
        report.failed_step, report.exit_code = step, code
        assert ("--resume run-20260101-000000-abcd" in summary(report)) is offered, (step, code)
    report.failed_step, report.exit_code = "deploy", 1
    assert "its trained model goes on from the gate" in summary(report)


def test_a_run_stopped_before_its_steps_began_is_stopped_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume stopped while its services start: its folder still holds the attempt before's
    records, which the summary showed as this attempt's steps (verify-data succeeded, train
    interrupted after 8.7 s, in a run of 0.2 s); a new run showed verify-data interrupted."""
    from pipelines import local
    from pipelines.report import summary
    from pipelines.steps import record_path

    cfg = load_config("smoke", overrides={"state_dir": str(tmp_path)}, environ={})
    run_dir = tmp_path / "runs" / "run-20260101-000000-abcd"
    record_path(run_dir, "train").parent.mkdir(parents=True)
    done = {"status": "succeeded", "seconds": 0.2, "result": {}}
    record_path(run_dir, "verify-data").write_text(json.dumps(done))
    stopped = {"status": "failed", "seconds": 8.7, "error": "interrupted", "exit_code": 130}
    record_path(run_dir, "train").write_text(json.dumps(stopped))

    def ctrl_c(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "start_fork_server", ctrl_c)
    for resume_id in ("run-20260101-000000-abcd", None):
        report = local.run_pipeline(cfg, resume_id=resume_id)
        assert (report.exit_code, report.failed_step) == (130, None)
        assert {s.status for s in report.steps} == {"skipped"}
        assert "FAILED at start-up: interrupted" in summary(report)


def test_the_summary_says_how_to_open_this_runs_mlflow_ui_again() -> None:
    """It said `make mlflow-ui`, which opens the default state dir's, for a run of another
    state dir, and for a run logged to a tracking server of its own."""
    from pipelines.local import RunReport
    from pipelines.report import browse_later

    assert browse_later(RunReport(embedded_mlflow=True)) == "browse later with `make mlflow-ui`"
    assert browse_later(RunReport(embedded_mlflow=True, state_dir="/tmp/my runs")) == (
        "browse later with `python pipelines/run.py mlflow-ui --state-dir '/tmp/my runs'`"
    )
    external = RunReport(tracking_uri="http://mlflow.example:5000", state_dir="/tmp/x")
    assert browse_later(external) == "on a tracking server that stays up"


def test_torchrun_workers_report_their_config_error(tmp_path: Path) -> None:
    """torchrun exits 1 whatever its workers' codes: the step reads the reason they reported."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys; from pipelines.cli import run_main; from pipelines.errors import ConfigError\n"
        "def body(): raise ConfigError('train.x=1: bad')\n"
        "sys.exit(run_main(body))\n"
    )
    error_report = tmp_path / "error.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{REPORT_ENV: str(error_report)})
    code = run_torchrun([str(worker)], env, 2, 0, tmp_path / "logs", lambda _: None)
    assert code == 1  # torchrun's own, not the workers' 2
    error = reported(error_report)
    assert isinstance(error, ConfigError) and str(error) == "train.x=1: bad"


def test_torchrun_workers_keep_a_signal_the_step_ignores(tmp_path: Path) -> None:
    """torchrun's agent handles SIGHUP whatever its starter ignores: under nohup, a hangup
    stopped a two-worker run, and its workers started with SIGHUP at its default."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys\n"
        "path = os.path.join(sys.argv[1], os.environ['RANK'])\n"
        "open(path, 'w').write(str(int(signal.getsignal(signal.SIGHUP))))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    kept = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        code = run_torchrun(
            [str(worker), str(tmp_path)], env, 2, 0, tmp_path / "logs", lambda _: None
        )
    finally:
        signal.signal(signal.SIGHUP, kept)
    assert code == 0
    assert [(tmp_path / rank).read_text() for rank in "01"] == [str(int(signal.SIG_IGN))] * 2


def test_kfp_bookkeeping_is_left_out_of_the_run_log() -> None:
    task = "12:00:00.001 - INFO - Task \x1b[96m'verify-data'\x1b[0m"
    executor = "    [KFP Executor 2026-11-26 12:00:00,000 INFO]: "
    lines = [  # (a line kfp.local prints, whether the user sees it)
        ("12:00:00.000 - INFO - Executing task \x1b[96m'verify-data'\x1b[0m", True),
        (executor + "Looking for component `verify_data`", False),
        (executor + "Got executor_input:", False),
        ("    {", False),
        ('        "inputs": {', False),
        ('            "config": "{\\"profile\\":\\"smoke\\"}"', False),
        ("        }", False),
        ("    }", False),
        (executor + "uploaded 1 of 1 objects (2.0 MB)", True),
        ("    [rank0] error: train.x=1: bad", True),
        (executor + "Wrote executor output file to /x.", False),
        ("    ", True),
        (f"{task} finished with status \x1b[91mFAILURE\x1b[0m", True),
        (f"{task} outputs:", False),
        ('    Output: \'{"dataset": "synthetic"}\'', False),
        ("-" * 80, True),
    ]
    text = "".join(line + "\n" for line, _ in lines)
    out = io.StringIO()
    with QuietKfp(out) as quiet:
        for i in range(0, len(text), 7):  # in pieces, as print writes
            quiet.write(text[i : i + 7])
    assert out.getvalue() == "".join(line + "\n" for line, shown in lines if shown)


def test_failed_step_exits_1_without_traceback(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    out = run(
        "pipelines/run.py",
        "--dataset",
        "imagefolder",
        "--data",
        str(archive),
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["status"] == "failed" and report["failed_step"] == "verify-data"
    assert "broken.tar.gz: the archive is truncated or corrupt" in report["error"]
    statuses = [s["status"] for s in report["steps"]]
    assert statuses[0] == "failed" and set(statuses[1:]) == {"skipped"}


def test_unreachable_store_fails_fast_and_names_it(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"MINIO_ENDPOINT": endpoint, "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"}
    out = run(
        "-m",
        "components.verify_data",
        "--dataset",
        "synthetic",
        "--state-dir",
        str(tmp_path),
        env=env,
    )
    assert out.returncode == 1
    assert f"cannot reach the S3 store at {endpoint}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_store_endpoint_that_is_not_s3_is_named_in_one_line(tmp_path: Path) -> None:
    """Another web server on the port (or a proxy's error page) answered no S3 XML: minio's
    InvalidResponseError was a traceback, and --json printed nothing."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    web = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{web.server_address[1]}"
    env = {"MINIO_ENDPOINT": endpoint, "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"}
    try:
        out = run(
            "pipelines/run.py", "--dataset", "synthetic", "--profile", "smoke", "--json",
            "--state-dir", str(tmp_path / "state"), env=env,
        )  # fmt: skip
    finally:
        web.shutdown()
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{endpoint} answered HTTP 501 with no S3 response" in out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["status"] == "failed" and "check MINIO_ENDPOINT" in report["error"]


def test_pipeline_end_to_end_twice(tmp_path: Path) -> None:
    """The whole pipeline twice on generated data with 2 DDP workers: two embedded S3 servers
    with fresh keys over one persistent store, a served model, MLflow's champion alias; then
    once more with a gate no model can pass."""
    state, home, scratch = tmp_path / "state", tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    outside = {"HOME": str(home), "TMPDIR": str(scratch)}
    args = [
        "pipelines/run.py",
        "--dataset",
        "synthetic",
        "--profile",
        "smoke",
        "--json",
        "--workers",
        "2",
        "--port",
        str(free_port()),
        "--state-dir",
        str(state),
    ]
    first = run(*args, env=outside)
    assert first.returncode == 0, first.stderr
    second = run(*args, "--epochs", "1", env=outside)  # the data steps' reuse is its point
    assert second.returncode == 0, second.stderr
    one, two = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second))
    steps = ["verify-data", "feature-engineering", "train", "verify-model", "deploy"]
    assert [(s["name"], s["status"]) for s in one["steps"]] == [(n, "succeeded") for n in steps]
    assert one["status"] == "succeeded" and one["metrics"]["test_accuracy"] > 0.5
    # deploy compares the served V1 and V2 answers with the in-process model's.
    assert one["deploy"]["smoke_agreement"] == 1.0 and one["deploy"]["smoke_images"] == 16
    assert one["mlflow"]["alias"] == "champion" and one["mlflow"]["version"] == "1"
    assert two["mlflow"]["version"] == "2"
    assert one["data"]["uploaded"] == 1 and two["data"]["uploaded"] == 0
    assert (one["features"]["skipped"], two["features"]["skipped"]) == (False, True)
    assert "uploaded nothing" in second.stderr
    # The readable summary, the splits in one order on both runs (the second's, read back
    # from the stored JSON, came alphabetical).
    assert "(unchanged, reused): train 540, val 60, test 120" in second.stderr
    # The embedded store's URL and keys were the run's: it says where the objects stay.
    assert f"S3 store    embedded, stopped; its objects stay in {state}/s3\n" in first.stderr
    assert (
        "classes, train 600, test 120" in first.stderr
        and "classes, train 600, test" in second.stderr
    )
    # Every step wrote inside the state dir only.
    assert not list(home.iterdir()) and not list(scratch.iterdir())
    # The model server's log holds its requests and its stop, and no warning: KServe's stop,
    # run again as uvicorn re-raised the signal, left "coroutine ... never awaited" there.
    (log,) = (state / "serving").glob("*.log")
    assert "Finished server process" in log.read_text()
    assert "Warning" not in log.read_text(), log.read_text()

    # Each step's process, and the model server, forked from the run's fork server.
    forks = (state / "runs" / one["run_id"] / "fork-server.log").read_text()
    assert forks.count("forked pipelines.kfp_task:main") == 5
    assert forks.count("forked serving.__main__:main") == 1
    assert "forked training.train:main" not in forks  # 2 workers: torchrun starts them

    # A gate the model cannot pass fails the run at verify-model: nothing deployed, champion
    # unchanged. The smoke recipe can score 1.0 on synthetic images, so this model trains at a
    # near-zero lr and stays near chance. One worker this time: the trainer forks too.
    client = mlflow.MlflowClient(f"sqlite:///{state / 'mlflow' / 'mlflow.db'}")
    name = one["mlflow"]["registered_model"]
    before = client.get_model_version_by_alias(name, "champion").version
    gate = ["--set", "gate.min_accuracy=1.0", "--set", "train.lr=0.000001"]
    gated = run(*args, "--workers", "1", "--epochs", "1", *gate)
    assert gated.returncode == 1
    three = json.loads(gated.stdout.strip().splitlines()[-1])
    forks = (state / "runs" / three["run_id"] / "fork-server.log").read_text()
    assert forks.count("forked training.train:main") == 1
    assert three["failed_step"] == "verify-model" and "below gate.min_accuracy" in three["error"]
    assert [s["status"] for s in three["steps"]][-2:] == ["failed", "skipped"]
    assert three["endpoint"] is None and three["mlflow"]["alias"] is None

    # MLflow's own store (the servers are gone) holds the runs and the unchanged champion.
    assert client.get_run(one["mlflow"]["run_id"]).info.status == "FINISHED"
    assert client.get_model_version_by_alias(name, "champion").version == before


def smoke_args(state: Path) -> list[str]:
    """A smoke run of 6 epochs: time to stop it in training."""
    args = ["pipelines/run.py", "--dataset", "synthetic", "--profile", "smoke", "--epochs", "6"]
    return [*args, "--port", str(free_port()), "--state-dir", str(state)]


def driver_until(
    args: list[str], marker: str = r"epoch \d/6 ", json_apart: bool = False
) -> tuple[subprocess.Popen[str], list[str]]:
    """The driver, started in a session of its own (a signal to its group reaches only it and
    its processes), and its log lines up to the first that `marker` (a regex) matches: by
    default, this attempt's first epoch, whichever a resume starts at. With json_apart, those
    are stderr's, and stdout keeps the --json line."""
    driver = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if json_apart else subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log = driver.stderr if json_apart else driver.stdout
    assert log is not None
    lines = []
    for line in log:
        lines.append(line)
        if re.search(marker, line):
            break
    return driver, lines


def test_resume_restores_what_flags_and_files_chose_and_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run's settings, as --resume rebuilds them: its profile, flags and --config values, a
    relative --data made absolute (a resume may start elsewhere); not what the environment
    set, which stays the environment's. Flags given now win. A run of an earlier version has
    no settings file: the flags given are its settings, as before."""
    from pipelines.config import ENV_VARS
    from pipelines.local import SETTINGS, save_settings
    from pipelines.run import build_parser, resumed_config

    state, run_id = tmp_path / "state", "run-20260101-000000-abcd"
    run_dir = state / "runs" / run_id
    run_dir.mkdir(parents=True)
    (tmp_path / "pets.tar.gz").write_bytes(b"")
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("train:\n  lr: 0.05\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIO_REGION", "eu-west-1")
    args = ["run", "--profile", "smoke", "--dataset", "imagefolder", "--data", "pets.tar.gz"]
    args += ["--config", str(yaml_file), "--epochs", "5", "--state-dir", str(state)]
    first = config_from(args)
    save_settings(first, run_dir)
    stored = json.loads((run_dir / SETTINGS).read_text())
    assert stored["profile"] == "smoke"
    assert f'dataset.source="{tmp_path}/pets.tar.gz"' in stored["set"]
    assert not {s.partition("=")[0] for s in stored["set"]} & set(ENV_VARS.values())

    monkeypatch.chdir(ROOT)
    plain = build_parser().parse_args(["run", "--resume", run_id, "--state-dir", str(state)])
    again = resumed_config(plain, config_from(["run", "--state-dir", str(state)]))
    assert again.public_dict() == {
        **first.public_dict(),
        "dataset": {**first.public_dict()["dataset"], "source": f"{tmp_path}/pets.tar.gz"},
    }
    assert again.storage.region == "eu-west-1"  # still from the environment
    more = build_parser().parse_args(["run", "--resume", run_id, "--state-dir", str(state)])
    more.set = ["train.epochs=7"]
    assert resumed_config(more, again).train.epochs == 7
    # A --config file given now wins over the stored settings it names, flags over both.
    (tmp_path / "now.yaml").write_text("train:\n  lr: 0.02\n  epochs: 6\n")
    more.config = tmp_path / "now.yaml"
    filed = resumed_config(more, again)
    assert (filed.train.lr, filed.train.epochs, filed.dataset.name) == (0.02, 7, "imagefolder")
    # Another model name finds none of the run's checkpoints: it trained from the start, inside
    # the run's MLflow run.
    for change in (["serving.model_name=pets"], ["dataset.name=synthetic"]):
        other = build_parser().parse_args(["run", "--resume", run_id, "--state-dir", str(state)])
        other.set = change
        with pytest.raises(
            ConfigError,
            match=f"--resume {run_id}: its model and checkpoints are "
            f"under s3://models/imagefolder-resnet18/{run_id}/, and the settings",
        ):
            resumed_config(other, again)

    # The run's own --data, gone since (a download in /tmp, cleaned): the resume was refused
    # for it, though the store holds the data. A path given now stays for the checks.
    (tmp_path / "pets.tar.gz").unlink()
    assert resumed_config(plain, again).dataset.source is None
    assert f"{tmp_path}/pets.tar.gz, the run's dataset.source, is gone" in caplog.text
    moved = build_parser().parse_args(["run", "--resume", run_id, "--state-dir", str(state)])
    moved.set = [f"dataset.source={tmp_path}/moved.tar.gz"]
    assert resumed_config(moved, again).dataset.source == f"{tmp_path}/moved.tar.gz"

    (run_dir / SETTINGS).write_text("[1]")
    with pytest.raises(ConfigError, match=f"{SETTINGS} is not a run's settings file"):
        resumed_config(plain, again)
    (run_dir / SETTINGS).unlink()
    assert resumed_config(plain, again) is again


def config_from(argv: list[str]):
    from pipelines.cli import config_from_args
    from pipelines.run import build_parser

    return config_from_args(build_parser().parse_args(argv))


def test_runs_left_running_are_failed_before_a_local_mlflow_server_starts(tmp_path: Path) -> None:
    """A driver killed outright (SIGKILL, a machine that stopped) left its MLflow run RUNNING
    for good: the next start of the state dir's server, which holds its lock, closes it."""
    db = tmp_path / "mlflow.db"
    assert fail_left_running(db) == []  # none yet
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("image-classifier")
    left, ended = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(ended, "FINISHED")
    assert fail_left_running(db) == [left]
    info = client.get_run(left).info
    assert info.status == "FAILED" and info.end_time is not None
    assert client.get_run(ended).info.status == "FINISHED"
    assert fail_left_running(db) == []


def test_an_mlflow_server_out_of_reach_leaves_the_failing_step_as_it_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Closing an abandoned run is best effort, on a path that is failing already."""
    assert fail_abandoned(f"http://127.0.0.1:{free_port()}", "image-classifier", "run-x") == []
    assert "could not close the MLflow run of run-x" in caplog.text
    assert fail_abandoned(None, "image-classifier", "run-x") == []


def test_step_cli_against_a_configured_store(tmp_path: Path) -> None:
    source = synthetic.write("mnist", tmp_path / "mnist", per_class=20)
    with EmbeddedS3(tmp_path / "s3") as server:
        result = tmp_path / "out" / "verify.json"
        out = run(
            "-m",
            "components.verify_data",
            "--dataset",
            "mnist",
            "--data",
            str(source),
            "--result",
            str(result),
            "--state-dir",
            str(tmp_path / "st"),
            env=server.env(),
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(result.read_text()) == json.loads(out.stdout)
        out = run(
            "-m",
            "components.feature_engineering",
            "--dataset",
            "mnist",
            "--state-dir",
            str(tmp_path / "st"),
            env=server.env(),
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["counts"] == {"train": 180, "val": 20, "test": 40}


def test_a_kfp_step_without_store_keys_is_a_config_error(tmp_path: Path) -> None:
    """The KFP step runner (a pod whose Secret gave no keys): exit 2 and a record saying so."""
    from pipelines.config import load_config, public_json
    from pipelines.steps import record_path

    endpoint = "http://127.0.0.1:9"
    cfg = load_config("smoke", overrides={"state_dir": str(tmp_path)}, environ={})
    config = public_json(cfg)
    code = (
        "import sys; from pipelines.steps import run_step; "
        "run_step('verify-data', sys.argv[1], sys.argv[2])"
    )
    out = run("-c", code, config, str(tmp_path / "run"), env={"MINIO_ENDPOINT": endpoint})
    assert out.returncode == 2, out.stderr
    assert f"error: no credentials for {endpoint}: set MINIO_ACCESS_KEY" in out.stderr
    record = json.loads(record_path(tmp_path / "run", "verify-data").read_text())
    assert (record["status"], record["exit_code"]) == ("failed", 2)


def test_a_final_error_is_marked_in_the_pods_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod, a step's error is its termination message, which Argo's retry expression
    reads (argo.retries): a gate missed or a digest that does not match is marked no-retry,
    since each retry failed the same way; an unreachable store is not. Off a pod, no file."""
    from components.verify_model import GateError
    from pipelines import errors
    from pipelines.cli import run_main
    from pipelines.errors import IntegrityError, StorageError

    log = tmp_path / "termination-log"
    monkeypatch.setattr(errors, "TERMINATION_LOG", log)

    def fails(exc: Exception, in_pod: bool = True) -> str | None:
        def body() -> None:
            raise exc

        log.unlink(missing_ok=True)
        if in_pod:
            log.write_text("")  # kubelet creates the file; a container only writes it
        assert run_main(body) == 1
        return log.read_text() if log.exists() else None

    assert fails(GateError("test accuracy 0.1 < 0.5")) == "no-retry: test accuracy 0.1 < 0.5"
    assert fails(IntegrityError("s3://x/y does not match")).startswith("no-retry: ")
    assert fails(StorageError("cannot reach S3")) == "cannot reach S3"
    assert fails(GateError("x"), in_pod=False) is None
