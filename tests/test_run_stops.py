"""The local run stopped at its worst moments: Ctrl-C, SIGTERM, SIGHUP and SIGKILL to the
driver, a step, the trainer, the fork server and the MLflow server, in real pipeline runs. A
file of its own: `make test` runs the suite a file per process, and these long runs kept the
CLI's file, and with it one process, busy long after the other had finished."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil

from pipelines.mlflow_server import local_db
from pipelines.processes import free_port
from tests.test_cli import ROOT, driver_lines, driver_until, run, smoke_args


def test_a_run_interrupted_in_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C during training (to the whole process group, as a terminal sends it): a summary
    naming the interrupted step and the command that resumes it; --resume then goes on from
    the last checkpoint in the same MLflow run. A completed, unknown or malformed run id is
    refused."""
    state = tmp_path / "state"
    args = ["pipelines/run.py", "--dataset", "synthetic", "--profile", "smoke", "--json"]
    args += ["--epochs", "4", "--port", str(free_port()), "--state-dir", str(state)]
    # At epoch 3, epoch 2's checkpoint has waited for epoch 1's upload: one is in S3.
    first, lines = driver_until(args, "epoch 3/4", json_apart=True)
    os.killpg(first.pid, signal.SIGINT)
    out, err = first.communicate(timeout=120)
    err = "".join(lines) + err
    assert first.returncode == 130, err
    report = json.loads(out.strip().splitlines()[-1])
    run_id, mlflow_run = report["run_id"], re.search(r"MLflow run (\w+) at", err)
    assert [s["status"] for s in report["steps"]] == ["succeeded"] * 2 + ["interrupted"] + [
        "skipped"
    ] * 2
    assert report["error"] == "interrupted"
    # The driver's own lines. (A trainer stopped at an arbitrary point may, rarely, show
    # Python's 'Exception ignored' report of a signal that landed in a finalizer.)
    assert "Traceback" not in driver_lines(err)
    assert f"resume      python pipelines/run.py --resume {run_id} --state-dir {state} (" in err
    # The trainer ended its MLflow run while the server was up: the terminal's Ctrl-C reached
    # the S3 and MLflow servers too, which quit at once, and the run stayed RUNNING.
    assert mlflow_run is not None
    with sqlite3.connect(state / "mlflow" / "mlflow.db") as db:
        (status,) = db.execute(
            "select status from runs where run_uuid = ?", (mlflow_run[1],)
        ).fetchone()
    assert status == "KILLED", err

    # A resume refused for its flags (another epoch count, which the checkpoint was not
    # trained for) leaves the run's settings as they were: they were rewritten with its flags,
    # and the command below refused from then on.
    settings = state / "runs" / run_id / "settings.json"
    kept = settings.read_text()
    refused = run(
        "pipelines/run.py", "--resume", run_id, "--state-dir", str(state), "--epochs", "5"
    )
    assert refused.returncode == 2 and "another config" in refused.stderr, refused.stderr
    assert settings.read_text() == kept

    # That line is the whole command: the run's profile and settings are restored (before,
    # it ran the defaults, cifar10 and quick, unless every flag was given again).
    # A setting a resume may change (the final evaluation's flip TTA) is the run's tag: its
    # params are immutable, and read as the model's evaluation before.
    resumed = run(
        "pipelines/run.py", "--resume", run_id, "--state-dir", str(state), "--json",
        "--set", "train.flip_tta=false",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert again["run_id"] == run_id and again["status"] == "succeeded"
    assert 1 <= again["train"]["resumed_from_epoch"] <= 3
    assert [h["epoch"] for h in again["train"]["history"]] == [1, 2, 3, 4]
    start = again["train"]["resumed_from_epoch"]
    assert f"resuming {run_id} from epoch {start} of 4" in resumed.stderr
    assert f"in training (4 epochs, resumed after epoch {start}, 1 process(es)" in resumed.stderr
    assert mlflow_run is not None and again["mlflow"]["run_id"] == mlflow_run[1]
    with sqlite3.connect(state / "mlflow" / "mlflow.db") as db:
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (mlflow_run[1],)))
        params = dict(
            db.execute("select key, value from params where run_uuid = ?", (mlflow_run[1],))
        )
    assert (params["train.flip_tta"], tags["mlops.resumed.train.flip_tta"]) == ("True", "False")
    assert "mlops.resumed.train.eval_every" not in tags  # unchanged

    for resume, message in (
        (run_id, f"--resume {run_id}: that run completed, its model is s3://models/"),
        ("run-20990101-000000-abcd", f"no such run in {state}/runs; the latest is {run_id}"),
        ("../etc", "--resume '../etc' is not a run id (run-YYYYMMDD-HHMMSS-xxxx"),
    ):
        refused = run(*args, "--resume", resume)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    other = [a for a in args if a not in ("--profile", "smoke")]
    refused = run(*other, "--profile", "quick", "--resume", run_id)
    assert refused.returncode == 2, refused.stderr
    assert f"--profile quick: {run_id} is a smoke run, and --resume goes on" in refused.stderr

    # Stopped once its model was complete, before deploy, or a resume of it stopped at its
    # start, which clears the attempt before's step records: the resume goes on from the gate
    # with that model. It was refused as completed, and the model was never gated nor deployed.
    shutil.rmtree(state / "runs" / run_id / "steps")
    after = run("pipelines/run.py", "--resume", run_id, "--state-dir", str(state), "--json")
    assert after.returncode == 0, after.stderr
    final = json.loads(after.stdout.strip().splitlines()[-1])
    assert final["status"] == "succeeded" and final["deploy"] is not None
    assert f"run {run_id} trained its model before it was stopped" in after.stderr
    # This attempt's MLflow server, not the one the model's training attempt ran with.
    assert f"MLflow      {final['mlflow']['tracking_uri']}/#/experiments/" in after.stderr
    assert (final["model_uri"], final["train"]) == (again["model_uri"], again["train"])


def test_a_stopped_driver_leaves_no_process_behind(tmp_path: Path) -> None:
    """A closed terminal (SIGHUP to the whole group; before, it ended every process at once,
    its clean-up unrun) stops a run as `kill` (SIGTERM) and Ctrl-C do: every process it
    started ends, the trainer first, while the servers are up; a summary, exit 143. A
    SIGKILL runs no clean-up: the S3 and MLflow servers end by the kernel's parent-death
    signal, the fork server and its children by its watch on its parent. Before, both left the
    S3 and MLflow servers running on the state dir, and a trainer training on."""
    state = tmp_path / "state"
    args = smoke_args(state)
    for sig, resume in ((signal.SIGHUP, []), (signal.SIGKILL, ["--resume"])):
        if resume:
            resume.append(next((state / "runs").iterdir()).name)
        driver, lines = driver_until([*args, *resume])
        started = psutil.Process(driver.pid).children(recursive=True)
        assert len(started) >= 4  # S3, MLflow, the fork server and its children at least
        if sig == signal.SIGHUP:
            os.killpg(driver.pid, sig)  # its session's, as a terminal's hangup reaches it
        else:
            driver.send_signal(sig)
        out = "".join(lines) + driver.communicate(timeout=60)[0]
        _, alive = psutil.wait_procs(started, timeout=60)  # a bound, not a timing: 5-15 s
        assert not alive, [p.cmdline()[:4] for p in alive]
        if sig == signal.SIGHUP:
            assert driver.returncode == 143, out
            assert "FAILED at train: terminated" in out and "--resume run-" in out
            # The step, stopped too, recorded its end: before, it died without a record (0.0 s).
            step = re.search(r"^train +interrupted +(\d+\.\d)$", out, re.M)
            assert step is not None and float(step[1]) > 0, out
            # Nor the trainer's: its second SIGTERM (its step's) at times escaped as one.
            assert "Traceback" not in out, out
            # The trainer closed its MLflow run as stopped from outside, while MLflow was up.
            with contextlib.closing(sqlite3.connect(local_db(state))) as db:
                assert db.execute("SELECT status FROM runs").fetchall() == [("KILLED",)]


def train_processes(driver: subprocess.Popen[str]) -> tuple[psutil.Process, psutil.Process]:
    """The train step and its trainer, a run's driver's fork server's two children in training:
    the step forked first, then its trainer."""
    warm = next(
        p for p in psutil.Process(driver.pid).children() if "pipelines.warm_server" in p.cmdline()
    )
    step, trainer = sorted(warm.children(), key=lambda p: p.create_time())
    return step, trainer


def test_a_step_killed_outright_is_named_with_its_signal(tmp_path: Path) -> None:
    """A step SIGKILLed writes no record and prints nothing: the summary said "train crashed;
    its log above says why", and no log did. It names the signal now, and the trainer goes
    with its step."""
    driver, lines = driver_until(smoke_args(tmp_path / "state"))
    step, trainer = train_processes(driver)
    step.kill()
    out = "".join(lines) + driver.communicate(timeout=120)[0]
    assert driver.returncode == 1, out
    assert "FAILED at train: train was killed by SIGKILL (out of memory" in out, out
    _, alive = psutil.wait_procs([trainer], timeout=60)  # a bound, not a timing
    assert not alive


def test_a_trainer_killed_outright_leaves_its_mlflow_run_failed(tmp_path: Path) -> None:
    """A trainer SIGKILLed (as the OOM killer does) cannot end its MLflow run, which read
    RUNNING in the UI forever: the train step, once its restarts are spent, marks it FAILED."""
    state = tmp_path / "state"
    driver, lines = driver_until([*smoke_args(state), "--set", "train.max_restarts=0"])
    _, trainer = train_processes(driver)
    trainer.kill()
    out = "".join(lines) + driver.communicate(timeout=120)[0]
    assert driver.returncode == 1, out
    # A process killed outright prints nothing: the signal is named, and its usual sender.
    assert "FAILED at train: training failed (training killed by SIGKILL (out of memory" in out
    assert "marked FAILED: its trainer ended without closing it" in out, out
    with contextlib.closing(sqlite3.connect(local_db(state))) as db:
        rows = db.execute("SELECT status, end_time IS NOT NULL FROM runs").fetchall()
        source = db.execute("SELECT value FROM tags WHERE key = 'mlflow.source.name'").fetchall()
    assert rows == [("FAILED", 1)]
    # The forked trainer's source is its file, as for a fresh one: it was `training.train`,
    # and MLflow, which finds the git commit from it, recorded none.
    assert source == [(str(ROOT / "training" / "train.py"),)]


def test_a_run_whose_fork_server_dies_leaves_no_process_when_stopped(tmp_path: Path) -> None:
    """A forked step and trainer outlived a fork server killed under them (the OOM killer's
    likely pick, at about 1 GB) and a stopped driver: orphans, they trained on, restarted the
    trainer and rewrote the step's record. A child now ends with its client, server or not."""
    from pipelines.steps import record_path

    state = tmp_path / "state"
    driver, lines = driver_until(smoke_args(state))
    step, trainer = train_processes(driver)
    step.parent().kill()  # the fork server
    time.sleep(1)
    driver.send_signal(signal.SIGTERM)
    out = "".join(lines) + driver.communicate(timeout=120)[0]
    assert driver.returncode == 143, out
    _, alive = psutil.wait_procs([step, trainer], timeout=60)  # a bound, not a timing
    assert not alive, [p.pid for p in alive]
    # Stopped with the run: no second attempt, and the step's record is the stop's.
    (run_dir,) = (state / "runs").iterdir()
    assert [p.name for p in run_dir.glob("train-logs/*/*.log")] == ["attempt-0.log"]
    record = json.loads(record_path(run_dir, "train").read_text())
    assert record["exit_code"] == 143, record


def test_a_run_with_the_fork_server_off_starts_each_process_fresh(tmp_path: Path) -> None:
    """The setting that starts every step and the trainer as a fresh interpreter was a
    traceback before any step: its run folder was made only for the fork server's log."""
    state = tmp_path / "state"
    out = run(*smoke_args(state), "--set", "fork_server=false", "--epochs", "1")  # to its end
    assert out.returncode == 0, out.stderr
    assert not list((state / "runs").glob("*/fork-server.log"))


def test_a_run_whose_mlflow_server_dies_in_training_fails_at_once_naming_its_log(
    tmp_path: Path,
) -> None:
    """The trainer's MLflow client retried a refused connection for about 4 minutes a call
    (the bound on its retries was set at an import, in the fork server, and lost in the fork),
    then failed with a traceback of five chained exceptions; its restart waited 90 s more."""
    driver, lines = driver_until(smoke_args(tmp_path / "state"))
    [server] = [
        p for p in psutil.Process(driver.pid).children() if "pipelines.mlflow_serve" in p.cmdline()
    ]
    server.kill()
    # A bound, not a timing: the old code took some 10 minutes.
    out = "".join(lines) + driver.communicate(timeout=240)[0]
    assert driver.returncode == 1, out
    log = tmp_path / "state" / "mlflow" / "server.log"
    assert "FAILED at train: the MLflow server at http://127.0.0.1:" in out, out
    assert f"exited: see {log}" in out, out
    assert "Traceback" not in out, out
