"""Training with real torchrun processes, a real S3 server and a real MLflow server."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import psutil
import pytest
import requests
import torch

from components.train import train_model
from pipelines.config import public_json, storage_env
from pipelines.errors import ConfigError, PipelineError, StorageError
from pipelines.mlflow_server import with_tracking
from pipelines.processes import free_port
from pipelines.steps import run_step
from pipelines.storage import ObjectStore, parse_s3_uri
from training import checkpoint
from training.precision import Hardware, resolve

CPU = torch.device("cpu")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _cfg(env: SimpleNamespace, **train: object):
    return env.cfg.model_copy(update={"train": env.cfg.train.model_copy(update=train)})


def test_two_process_ddp_trains_logs_and_registers(env: SimpleNamespace) -> None:
    result = train_model(_cfg(env, workers=2), env.store, env.processed, "ddp-test")
    assert result.world_size == 2 and result.epochs == 3

    mlflow.set_tracking_uri(env.cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    losses = [m.value for m in client.get_metric_history(result.mlflow_run_id, "train_loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.test_accuracy > 0.5  # chance is 0.1

    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["train.workers"] == "2" and run.data.params["train.epochs"] == "3"
    secret = env.cfg.storage.secret_key.get_secret_value()
    assert all(secret not in str(v) for v in run.data.params.values())
    for key in ("images_per_s", "epoch_seconds", "val_accuracy", "lr", "test_accuracy"):
        assert key in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics), "no system metrics"
    tags = run.data.tags
    assert tags["mlops.pipeline_run_id"] == "ddp-test" and tags["mlops.world_size"] == "2"
    assert tags["mlops.feature_hash"] in env.processed
    # train.precision=auto resolved on this machine's hardware, recorded where users look.
    assert tags["mlops.precision"] == result.precision == resolve("auto", Hardware.detect(CPU))[0]
    plots = {a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/confusion_matrix.png"}
    version = client.get_model_version(result.registered_model, result.version)
    assert version.run_id == result.mlflow_run_id
    # The logged model carries the final figures, as MLflow's model page shows them.
    (output,) = run.outputs.model_outputs
    linked = {m.key: m.value for m in client.get_logged_model(output.model_id).metrics}
    assert linked["test_accuracy"] == result.test_accuracy
    assert linked["final_val_accuracy"] == result.val_accuracy  # with flip TTA, as served

    # The model object and its record agree, and record the lineage.
    bucket, prefix = parse_s3_uri(result.model_uri)
    weights = env.store.get_bytes(bucket, prefix + "model.safetensors")
    record = env.store.read_json(bucket, prefix + "model.json")
    assert hashlib.sha256(weights).hexdigest() == record["sha256"] == result.model_sha256
    assert record["lineage"]["mlflow_run_id"] == result.mlflow_run_id
    assert record["input"]["shape"] == [3, 32, 32] and len(record["classes"]) == 10
    assert record["precision"] == result.precision
    # The model is complete: its checkpoints' tensors are gone (KServe copies the whole folder
    # into each predictor pod), their pointer and state stay (a resume is still checked).
    kept = {o.key.rsplit("/", 1)[-1] for o in env.store.list(bucket, prefix + "checkpoints/")}
    assert "latest.json" in kept and any(k.endswith(".json") for k in kept - {"latest.json"})
    assert not [k for k in kept if k.endswith(".safetensors")], kept


def test_mlflow_server_is_one_process_with_no_job_runner(env: SimpleNamespace) -> None:
    # MLflow 3 starts a job runner and a huey consumer by default (idle, they took half a
    # core), and `mlflow server` runs uvicorn as a second interpreter: here the process that
    # was started serves the API itself, and starts nothing.
    assert env.mlflow.proc is not None
    server = psutil.Process(env.mlflow.proc.pid)
    assert server.children(recursive=True) == []
    port = int(env.cfg.mlflow.tracking_uri.rsplit(":", 1)[1])
    listening = [c.laddr.port for c in server.connections() if c.status == psutil.CONN_LISTEN]
    assert listening == [port]
    assert sorted(p.name for p in env.mlflow.workdir.glob("mlflow.db*")) == ["mlflow.db"]


def test_a_new_mlflow_database_appears_only_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server stopped during the first migrations used to leave a database every later
    start refused; now the half-built one is aside, and the next start builds it again."""
    import sqlalchemy
    from mlflow.store.db import utils
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    from pipelines.mlflow_server import create_database

    def interrupted(engine: sqlalchemy.engine.Engine) -> None:
        InitialBase.metadata.create_all(engine)  # the first tables, then a Ctrl-C
        raise KeyboardInterrupt

    db = tmp_path / "mlflow.db"
    real = utils._initialize_tables
    monkeypatch.setattr(utils, "_initialize_tables", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create_database(db)
    assert not db.exists() and (tmp_path / "mlflow.db.new").exists()
    monkeypatch.setattr(utils, "_initialize_tables", real)
    create_database(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        assert utils._all_tables_exist(engine)
    finally:
        engine.dispose()


def test_neither_the_embedded_server_nor_a_step_sends_mlflow_telemetry(
    env: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert env.mlflow.proc is not None
    server = psutil.Process(env.mlflow.proc.pid).environ()
    assert server.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    # A step takes the switch from its config parameter, as KFP passes it, and hands it on to
    # what it starts (torchrun's workers); a user who opts in gets telemetry back.
    probe = "from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY as v; print(v.get())"
    for key, value in storage_env(env.cfg.storage).items():
        monkeypatch.setenv(key, value)
    for telemetry, disabled in ((False, "True"), (True, "False")):
        cfg = env.cfg.model_copy(
            update={"mlflow": env.cfg.mlflow.model_copy(update={"telemetry": telemetry})}
        )
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "neither")  # restored after the test
        run_step("verify-data", public_json(cfg), str(tmp_path / str(telemetry)))
        gc.unfreeze()  # run_step freezes this process's objects for its exit
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == disabled, (telemetry, out.stderr)


def test_embedded_mlflow_server_refuses_other_hosts_and_origins(env: SimpleNamespace) -> None:
    """MLflow's DNS-rebinding and CORS guards are on: a page elsewhere cannot drive the server."""
    uri = env.cfg.mlflow.tracking_uri
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code == 200
    assert requests.get(search, headers={"Host": "evil.example"}, timeout=30).status_code == 403
    create = requests.post(
        f"{uri}/api/2.0/mlflow/experiments/create",
        json={"name": "cross-origin"},
        headers={"Origin": "http://evil.example"},
        timeout=30,
    )
    assert create.status_code == 403, create.text


def test_ranks_hold_identical_parameters(env: SimpleNamespace) -> None:
    result_file = env.root / "state" / "runs" / "ddp-test" / "train-result.json"
    digests = json.loads(result_file.read_text())["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    return [
        p.pid
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "training.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()
    ]


# Two ranks run under torchrun, which restarts both; one rank runs as a plain process, which
# the step restarts itself (pipelines/launcher.py).
@pytest.mark.parametrize(("workers", "epochs"), [(2, 3), (1, 2)])
def test_sigkill_one_rank_then_resume_with_full_history(
    env: SimpleNamespace, workers: int, epochs: int
) -> None:
    cfg = env.cfg
    run_id = f"kill-test-{workers}"
    child_env = {**os.environ, **env.s3.env(), "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    cmd = [
        sys.executable,
        "-m",
        "components.train",
        "--processed",
        env.processed,
        "--run-id",
        run_id,
        "--profile",
        "smoke",
        "--workers",
        str(workers),
        "--set",
        f"train.epochs={epochs}",
        "--set",
        f"dataset.name={cfg.dataset.name}",  # which names the model, as in a pipeline's steps
        "--state-dir",
        str(cfg.state_dir),
    ]
    launcher = subprocess.Popen(
        cmd, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pointer = f"{cfg.model_name}/{run_id}/checkpoints/latest.json"
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and launcher.poll() is None:
        latest = env.store.read_json("models", pointer)
        if latest and 1 <= latest["epoch"] < epochs:
            pids = _rank_pids(launcher)
            if len(pids) == workers:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    out, err = launcher.communicate(timeout=300)
    assert killed is not None, f"never saw a mid-run checkpoint: {err[-2000:]}"
    assert launcher.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["resumed_from_epoch"] >= 1 and result["epochs"] == epochs
    assert f"resuming {run_id} from epoch" in err
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    history = mlflow.MlflowClient().get_metric_history(result["mlflow_run_id"], "val_accuracy")
    assert sorted({m.step for m in history}) == list(range(1, epochs + 1))
    if workers == 1:
        assert "restart 1 of 1, from its last checkpoint" in err
        (launch,) = (cfg.state_dir / "runs" / run_id / "train-logs").iterdir()
        assert sorted(p.name for p in launch.iterdir()) == ["attempt-0.log", "attempt-1.log"]
        # A trainer started after the model was written (a restart that came late, a replaced
        # pod) ends with the stored result; the checkpoints' tensors are gone by then.
        again = subprocess.run(
            [sys.executable, "-m", "training.train", *cmd[3 : cmd.index("--state-dir")]],
            cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(again.stdout.strip().splitlines()[-1]) == result
        assert "trained its model before this start" in again.stderr


def test_corrupt_shard_fails_naming_it(env: SimpleNamespace) -> None:
    bucket, prefix = parse_s3_uri(env.processed)
    key = prefix + "val-00000.safetensors"
    original = env.store.get_bytes(bucket, key)
    env.store.put_bytes(bucket, key, original[:-1] + bytes([original[-1] ^ 1]))
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "training.train",
                "--processed",
                env.processed,
                "--profile",
                "smoke",
                "--set",
                "train.epochs=1",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, **env.s3.env(), "MLFLOW_TRACKING_URI": env.cfg.mlflow.tracking_uri},
        )
    finally:
        env.store.put_bytes(bucket, key, original)
    assert proc.returncode == 1
    assert "val-00000.safetensors: sha256 mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_the_data_cannot_satisfy(env: SimpleNamespace) -> None:
    # Features of another dataset than the config's, which names the model: a standalone
    # train step would register a synthetic model as cifar10-resnet18.
    cifar = env.cfg.model_copy(
        update={"dataset": env.cfg.dataset.model_copy(update={"name": "cifar10"})}
    )
    with pytest.raises(ConfigError) as refused:
        train_model(cifar, env.store, env.processed)
    assert str(refused.value) == (
        f"{env.processed} holds features of dataset synthetic, but the config's dataset is "
        "cifar10, after which the model would be named (cifar10-resnet18): pass --dataset "
        "synthetic, or name the model with --set serving.model_name=NAME"
    )
    with pytest.raises(ConfigError, match="exceeds the 540 training images"):
        train_model(_cfg(env, batch_size=1024), env.store, env.processed)
    with pytest.raises(ConfigError, match="must be a multiple of 3 ranks"):
        train_model(_cfg(env, workers=3, batch_size=32), env.store, env.processed)
    with pytest.raises(ConfigError, match=r"the val split holds 60 image\(s\), fewer than the 64"):
        train_model(_cfg(env, workers=64, batch_size=128), env.store, env.processed)


def test_unreachable_mlflow_fails_within_a_bounded_wait(env) -> None:
    cfg = with_tracking(env.cfg, f"http://127.0.0.1:{free_port()}")
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"wait_s": 2.0})})
    with pytest.raises(PipelineError, match="was not healthy within 2 s"):
        train_model(cfg, env.store, env.processed)


def test_unreachable_store_fails_naming_it(env: SimpleNamespace) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    storage = env.cfg.storage.model_copy(update={"endpoint": endpoint})
    with pytest.raises(StorageError, match=f"cannot reach the S3 store at {endpoint}"):
        train_model(env.cfg, ObjectStore(storage), env.processed)


def test_missing_shard_is_named(env: SimpleNamespace) -> None:
    from pipelines.errors import IntegrityError
    from training.data import load_processed

    bucket, prefix = parse_s3_uri(env.processed)
    key = prefix + "test-00000.safetensors"
    original = env.store.get_bytes(bucket, key)
    env.store.remove(bucket, key)
    try:
        with pytest.raises(IntegrityError, match=r"test-00000\.safetensors is missing"):
            load_processed(env.store, env.processed)
    finally:
        env.store.put_bytes(bucket, key, original)


# --- verify-model, on models trained here --------------------------------------------------


@pytest.fixture(scope="module")
def trained(env: SimpleNamespace):
    return train_model(_cfg(env, workers=1, epochs=2), env.store, env.processed, "verify-base")


def test_eval_every_skips_validation_and_changes_no_weight(env, trained) -> None:
    sparse = train_model(
        _cfg(env, workers=1, epochs=2, eval_every=5), env.store, env.processed, "eval-every"
    )
    # Validation draws no random numbers and leaves BatchNorm's statistics: the same weights.
    assert sparse.model_sha256 == trained.model_sha256
    assert sparse.test_accuracy == trained.test_accuracy
    client = mlflow.MlflowClient(env.cfg.mlflow.tracking_uri)

    def steps(run_id: str, key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, key))

    assert steps(sparse.mlflow_run_id, "train_loss") == [1, 2]
    assert steps(sparse.mlflow_run_id, "val_accuracy") == [2]  # the last epoch always
    assert steps(trained.mlflow_run_id, "val_accuracy") == [1, 2]


@contextlib.contextmanager
def carved_test_split() -> Any:
    """verify-model reads the test split as one carved out of the training images (a dataset
    with none of its own), where a champion's score recorded on its own split stands."""
    from components import verify_model as verify_model_module

    real = verify_model_module.load_processed

    def carved_split(*args: Any, **kwargs: Any) -> Any:
        meta, splits = real(*args, **kwargs)
        return meta | {"transform": {"test_source": "carved"}}, splits

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify_model_module, "load_processed", carved_split)
        yield


def test_gate_promotes_then_refuses_and_keeps_the_champion(
    env, trained, caplog: pytest.LogCaptureFixture
) -> None:
    from components.verify_model import GateError, recorded_score, verify_model
    from pipelines.registry import resolve

    first = verify_model(env.cfg, env.store, trained.model_uri)
    assert first.passed and first.promoted and first.test_accuracy > 0.2
    assert first.serving_uri == trained.model_uri
    client = mlflow.MlflowClient(env.cfg.mlflow.tracking_uri)
    assert client.get_model_version_by_alias(trained.registered_model, "champion").version == (
        trained.version
    )
    # A learning rate that leaves it near chance: surely below the champion. Trained without
    # mirrors, it is evaluated and served without them too.
    weak = train_model(
        _cfg(env, workers=1, epochs=1, lr=1e-6, hflip=False),
        env.store,
        env.processed,
        "verify-weak",
    )
    bucket, prefix = parse_s3_uri(weak.model_uri)
    assert env.store.read_json(bucket, prefix + "model.json")["flip_tta"] is False
    strict = env.cfg.model_copy(
        update={"gate": env.cfg.gate.model_copy(update={"min_accuracy": 0.999})}
    )
    with pytest.raises(GateError, match=r"test accuracy 0\.\d+ is below gate.min_accuracy 0\.9990"):
        verify_model(strict, env.store, weak.model_uri)
    champion = client.get_model_version_by_alias(trained.registered_model, "champion")
    assert champion.version == trained.version  # unchanged
    # The versions say how they fared, and serving a failed one says so.
    failed = client.get_model_version(weak.registered_model, weak.version).tags
    assert failed["mlops.gate"] == "failed" and float(failed["mlops.test_accuracy"]) < 0.999
    assert champion.tags["mlops.gate"] == "passed"
    with caplog.at_level(logging.WARNING, logger="mlops.registry"):
        resolve(strict, f"models:/{weak.registered_model}/{weak.version}")
    assert f"v{weak.version} failed the quality gate (test accuracy 0." in caplog.text
    record = env.store.read_json(bucket, prefix + "verification.json")
    assert record["passed"] is False and record["promoted"] is False
    assert record["serving_uri"] == trained.model_uri  # the champion stays in service

    # Through the gate but not better than the champion: deploy gets the champion's model.
    lenient = env.cfg.model_copy(
        update={"gate": env.cfg.gate.model_copy(update={"min_accuracy": 0})}
    )
    second = verify_model(lenient, env.store, weak.model_uri)
    assert second.passed and second.champion_version == trained.version
    assert second.champion_accuracy is not None
    assert second.test_accuracy < second.champion_accuracy and not second.promoted
    assert second.serving_uri == trained.model_uri

    # The champion's score comes from its own verification record when that was taken on the
    # same test split, and is measured again when it was not.
    bucket, prefix = parse_s3_uri(trained.model_uri)
    record = env.store.read_json(bucket, prefix + "verification.json")
    assert record["test_split"] == env.processed
    assert second.champion_accuracy == first.test_accuracy == record["test_accuracy"]
    try:
        env.store.write_json(bucket, prefix + "verification.json", record | {"test_accuracy": 0.5})
        assert verify_model(lenient, env.store, weak.model_uri).champion_accuracy == 0.5
        other_split = record | {"test_accuracy": 0.5, "test_split": "s3://processed-data/x/y/"}
        env.store.write_json(bucket, prefix + "verification.json", other_split)
        rescored = verify_model(lenient, env.store, weak.model_uri).champion_accuracy
        assert rescored == first.test_accuracy
        # Unless this test split is carved out of the training images, where another split's
        # may hold images the champion trained on: then its own split's record stands.
        with carved_test_split():
            assert verify_model(lenient, env.store, weak.model_uri).champion_accuracy == 0.5
        # A record that is not JSON, or not an object, is no reason to fail: it is scored again.
        key = prefix + "verification.json"
        a_flag = json.dumps({"test_split": env.processed, "test_accuracy": True}).encode()
        for broken in (b"{not json", b'["a list"]', a_flag):
            env.store.put_bytes(bucket, key, broken)
            assert recorded_score(env.store, trained.model_uri, env.processed) is None
    finally:
        env.store.write_json(bucket, prefix + "verification.json", record)


def test_a_champion_of_another_task_is_replaced_only_when_asked(
    env, trained, tmp_path: Path
) -> None:
    """An MNIST champion under the name a CIFAR-shaped model registers into: it cannot be
    scored on this model's data, and replacing it would break what its clients send."""
    from components.verify_model import GateError, verify_model
    from serving.untrained import write_untrained_model

    client = mlflow.MlflowClient(env.cfg.mlflow.tracking_uri)
    name, bucket = trained.registered_model, env.cfg.storage.buckets.models
    digits = [str(i) for i in range(10)]
    folder = write_untrained_model(tmp_path / "digits", digits, "s2", (1, 28, 28))
    for path in folder.iterdir():
        env.store.put_file(bucket, f"{name}/digits/{path.name}", path)
    uri = f"s3://{bucket}/{name}/digits/"
    other = client.create_model_version(name, uri, tags={"mlops.model_uri": uri})
    client.set_registered_model_alias(name, "champion", other.version)
    try:
        with pytest.raises(GateError) as refused:
            verify_model(env.cfg, env.store, trained.model_uri)
        assert str(refused.value).startswith(
            f"champion v{other.version} of {name} serves another task (1x28x28 images, 10 "
            "classes (0, 1, 2, ...)) than this model (3x32x32 images, 10 classes ("
        )
        assert "--set serving.model_name=NAME" in str(refused.value)
        # Its own recorded score, which a carved test split takes for a champion of this task,
        # is no comparison either: it was kept, and deploy served it, for another task's run.
        record = {"test_split": "s3://processed-data/digits/x/", "test_accuracy": 0.99}
        env.store.write_json(bucket, f"{name}/digits/verification.json", record)
        with carved_test_split(), pytest.raises(GateError, match="serves another task"):
            verify_model(env.cfg, env.store, trained.model_uri)
        assert client.get_model_version_by_alias(name, "champion").version == other.version
        forced = env.cfg.model_copy(
            update={"gate": env.cfg.gate.model_copy(update={"force_promote": True})}
        )
        result = verify_model(forced, env.store, trained.model_uri)
        assert result.promoted and result.champion_version == other.version
        assert result.champion_accuracy is None  # not comparable, so not compared
    finally:
        client.set_registered_model_alias(name, "champion", trained.version)


def test_a_champion_that_cannot_be_served_is_replaced_by_a_model_that_passes(
    env, trained, caplog: pytest.LogCaptureFixture
) -> None:
    """A champion whose weights changed or went from the store was kept on its recorded
    score, and deploy then failed on it in every run that did not beat that score; scored
    again, it failed before gate.force_promote was read."""
    from components.verify_model import verify_model

    client = mlflow.MlflowClient(env.cfg.mlflow.tracking_uri)
    name = trained.registered_model
    client.set_registered_model_alias(name, "champion", trained.version)
    other = train_model(_cfg(env, workers=1, epochs=1), env.store, env.processed, "challenger")
    lenient = env.cfg.model_copy(
        update={"gate": env.cfg.gate.model_copy(update={"min_accuracy": 0})}
    )
    bucket, prefix = parse_s3_uri(trained.model_uri)
    key = prefix + "model.safetensors"
    original = env.store.get_bytes(bucket, key)
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    try:
        for spoil in ("changed", "gone"):
            if spoil == "changed":
                env.store.client.put_object(bucket, key, io.BytesIO(bytes(changed)), len(changed))
            else:
                env.store.remove(bucket, key)
            client.set_registered_model_alias(name, "champion", trained.version)
            caplog.clear()
            result = verify_model(lenient, env.store, other.model_uri)
            assert result.promoted and result.serving_uri == other.model_uri, spoil
            assert result.champion_accuracy is None  # not compared: it cannot be served
            assert f"champion v{trained.version} cannot be served any more" in caplog.text
    finally:
        env.store.put_bytes(bucket, key, original)
        client.set_registered_model_alias(name, "champion", trained.version)


def test_a_run_id_of_another_config_is_refused_before_training_starts(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint of another config under the run id: the step refuses it from the
    # checkpoint's state before any process starts, for torchrun's workers too.
    bucket = env.cfg.storage.buckets.models
    prefix = f"{env.cfg.model_name}/config-error/checkpoints/"
    other = checkpoint.Checkpoint(1, {"rng.torch": torch.zeros(1)}, {"config_hash": "another"})
    checkpoint.upload(env.store, bucket, prefix, checkpoint.encode(other))
    run_dir = env.cfg.state_dir / "runs" / "config-error"
    for workers in (2, 1):
        with pytest.raises(ConfigError, match=r"holds a checkpoint of another config"):
            train_model(_cfg(env, workers=workers), env.store, env.processed, "config-error")
        assert not run_dir.exists()  # nothing started, not even a config file written

    # The trainer refuses it too (a PyTorchJob's pods, or a step that did not check): exit 2,
    # which a restart (the smoke profile allows one) could only repeat, so none is made.
    monkeypatch.setattr("components.train.check_run_id", lambda *args: None)
    with pytest.raises(ConfigError, match=r"holds a checkpoint of another config"):
        train_model(_cfg(env, workers=1), env.store, env.processed, "config-error")
    (launch,) = (run_dir / "train-logs").iterdir()
    assert [p.name for p in launch.iterdir()] == ["attempt-0.log"]
    assert "holds a checkpoint of another config" in (launch / "attempt-0.log").read_text()


def test_a_damaged_shard_fails_training_once_without_a_restart(env: SimpleNamespace) -> None:
    """Each restart read the shard again and refused it again; the error says what to do."""
    bucket, prefix = parse_s3_uri(env.processed)
    key = prefix + "val-00000.safetensors"
    original = env.store.get_bytes(bucket, key)
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    env.store.client.put_object(bucket, key, io.BytesIO(bytes(damaged)), len(damaged))
    try:
        with pytest.raises(PipelineError, match=r"sha256 mismatch.*Run the pipeline again") as e:
            train_model(_cfg(env, workers=1), env.store, env.processed, "damaged-shard")
        assert e.value.final and e.value.exit_code == 1
    finally:
        env.store.put_bytes(bucket, key, original)
    (launch,) = (env.cfg.state_dir / "runs" / "damaged-shard" / "train-logs").iterdir()
    assert [p.name for p in launch.iterdir()] == ["attempt-0.log"]


def test_a_tracking_uri_that_is_not_mlflow_fails_once_in_one_line(
    env: SimpleNamespace, tmp_path: Path
) -> None:
    """Another web server at MLFLOW_TRACKING_URI (it answers /health): its HTML page came back
    as 13 lines of error, and the trainer was restarted against it."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "health").write_text("OK")

    class Files(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    web = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{web.server_address[1]}"
    cfg = _cfg(env, workers=1)
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})
    try:
        with pytest.raises(PipelineError, match=f"MLflow at {uri} refused the run") as failed:
            train_model(cfg, env.store, env.processed, "not-mlflow")
    finally:
        web.shutdown()
    assert "(an HTML page, not the API's answer)" in str(failed.value)
    assert "\n" not in str(failed.value) and failed.value.final
    (launch,) = (env.cfg.state_dir / "runs" / "not-mlflow" / "train-logs").iterdir()
    assert [p.name for p in launch.iterdir()] == ["attempt-0.log"]


def test_tampered_model_fails_verification(env, trained) -> None:
    from components.verify_model import verify_model
    from pipelines.errors import IntegrityError

    bucket, prefix = parse_s3_uri(trained.model_uri)
    key = prefix + "model.safetensors"
    original = env.store.get_bytes(bucket, key)
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    env.store.client.put_object(bucket, key, io.BytesIO(bytes(tampered)), len(tampered))
    try:
        with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 mismatch"):
            verify_model(env.cfg, env.store, trained.model_uri)
    finally:
        env.store.put_bytes(bucket, key, original)


@pytest.mark.parametrize("end", ["pod SIGTERM", "rank SIGKILL", "rank exit 2", "rank done"])
def test_the_pod_command_exits_as_the_operators_exitcode_policy_reads_it(
    end: str, tmp_path: Path
) -> None:
    """A PyTorchJob pod runs torchrun as training.torchrun: a drained node's SIGTERM is 143
    and a rank the OOM killer ended is 137, codes the ExitCode policy gives a new pod; a rank's
    own failure keeps its code (2: a config error, which would fail again). Stock torchrun
    exits 1 for all of these, so every kill failed the job. Real torchrun processes."""
    started = tmp_path / "started"
    code = 2 if end == "rank exit 2" else 0
    wait = "time.sleep(60)" if "SIG" in end else ""
    (tmp_path / "rank.py").write_text(
        f"import os, sys, time\nopen({str(started)!r}, 'w').write(str(os.getpid()))\n"
        f"{wait}\nsys.exit({code})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "training.torchrun", "--nproc_per_node=1"]
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "rank.py")], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        if "SIG" in end:
            deadline = time.monotonic() + 60
            while not (started.exists() and started.read_text()) and time.monotonic() < deadline:
                time.sleep(0.1)
            rank = psutil.Process(int(started.read_text()))
            if end == "pod SIGTERM":
                proc.send_signal(signal.SIGTERM)
            else:
                rank.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    expected = {"pod SIGTERM": 143, "rank SIGKILL": 137, "rank exit 2": 2, "rank done": 0}[end]
    assert proc.returncode == expected, err
    assert "Traceback" not in err, err
    if end == "pod SIGTERM":
        assert "torchrun: stopped by SIGTERM" in err
        assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE  # stopped too
    elif end != "rank done":
        assert f"exitcode  : {-9 if expected == 137 else 2} " in err, err


def test_a_cluster_trainers_restarts_are_bounded_by_backoff_limit(make_cfg, store) -> None:
    """Under ExitCode the operator gives a killed Master a new pod whatever backoffLimit says:
    the trainer counts its starts beside the run's checkpoints and refuses the one past
    cluster.backoff_limit restarts, with a code (1) that ends the job."""
    from training import resume

    store.ensure_buckets()
    cfg = make_cfg(cluster__backoff_limit=2)
    assert [resume.count_start(store, cfg, "run-a") for _ in range(3)] == [1, 2, 3]
    with pytest.raises(
        PipelineError, match=r"run-a was started 3 times, its cluster\.backoff_limit=2"
    ):
        resume.count_start(store, cfg, "run-a")
    assert resume.count_start(store, cfg, "run-b") == 1  # per run
