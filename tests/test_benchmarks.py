"""The benchmark report states each target against its measured value, or says it is missing."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import gpu_time_to_accuracy as gpu
from benchmarks.ab import git
from benchmarks.common import ROOT, recipe
from benchmarks.report import targets
from benchmarks.time_to_accuracy import curve
from pipelines.config import PipelineConfig, load_config


def test_targets_are_judged_from_the_results() -> None:
    tc = PipelineConfig().train
    docs = {
        "time_to_accuracy": {
            "figures": [
                {
                    "profile": "quick",
                    "test_accuracy": 0.83,
                    "val_accuracy": 0.84,
                    "wall_s": 580.0,
                    "met": False,
                },
            ]
        },
        "pipeline_overhead": {
            "summary": {"overhead_warm_median_s": 18.0, "overhead_cold_s": 25},
            "machine": {"cpu": "AMD EPYC", "cores": 2, "avx512_bf16": False, "amx": False},
        },
        "serving": {"summary": {"p50_ratio": 1.2, "throughput_ratio": 0.5}},
        "train_throughput": {
            "machine": {"avx512_bf16": True, "amx": False},
            "figures": [
                {"stem": tc.stem, "precision": "bf16", "ddp_ratio": 0.93},
                {"stem": tc.stem, "precision": "fp32", "ddp_ratio": 0.5},
            ],
        },
    }
    rows = {r["target"].split(",")[0]: r for r in targets(docs)}
    assert rows["`quick` profile"]["verdict"] == "NOT met"
    assert rows["`quick` profile"]["measured"] == "83.00% test / 84.00% val in 9.7 min"
    assert rows["`full` profile"]["verdict"] == "not measured"
    # A run that recorded its pace shows it: runs on hosts of different speed compare.
    quick = docs["time_to_accuracy"]["figures"][0]
    quick |= {"train_images_per_s": 612.4, "beyond_epochs_s": 61.2}
    assert targets(docs)[0]["measured"] == (
        "83.00% test / 84.00% val in 9.7 min (training at 612 img/s; 61 s beyond the epochs)"
    )
    # A row says when it ran; one kept from before a recipe change says it is not today's.
    today = recipe(load_config("quick", environ={}).train, "bf16")
    quick |= {"measured": "2026-11-27, abc1234", "recipe": today}
    assert targets(docs)[0]["measured"].endswith("epochs), 2026-11-27, abc1234")
    quick["recipe"] = today.replace("label smoothing", "label smoothing 0.1, was")
    assert "; an earlier recipe (s" in targets(docs)[0]["measured"]
    assert targets(docs)[0]["measured"].endswith("), not today's `quick`")
    assert rows["pipeline overhead (smoke"]["verdict"] == "met"
    # Start-up speed differs between hosts: the figure names the machine that measured it.
    over = rows["pipeline overhead (smoke"]["measured"]
    host = "the 2-core AMD EPYC without AVX512-BF16"
    assert over == f"18.0 s beyond the epochs (first run 25 s) on {host}"
    assert rows["serving p50"]["verdict"] == "met"
    assert rows["serving 16-client throughput / in-process batched"]["verdict"] == "NOT met"
    # The default precision (auto) is bf16 on a CPU with AVX512-BF16: its row is the one judged.
    ddp = rows[f"DDP 2 procs / 1 proc x 2 threads ({tc.stem}"]
    assert ddp["verdict"] == "met" and ddp["measured"] == "0.93x"
    docs["train_throughput"]["machine"] = {"avx512_bf16": False, "amx": False}
    rows = {r["target"].split(",")[0]: r for r in targets(docs)}
    ddp = rows[f"DDP 2 procs / 1 proc x 2 threads ({tc.stem}"]
    assert ddp["verdict"] == "NOT met" and ddp["measured"] == "0.50x"
    assert ddp["target"].endswith(", fp32)")
    assert rows["ResNet-18 to 94% on one H100"]["verdict"] == "not measured"
    full = recipe(load_config("full", environ={}).train, "bf16", epochs=False) + ", eager"
    summary = {"device": "H100", "recipe": full, "target": 0.94, "epochs_to_target": 24}
    runs = [{"epochs": 40, "train_s": 70.0, "val_accuracy": 0.91}]
    for seconds, verdict in ((50.0, "met"), (61.0, "NOT met"), (None, "NOT met")):
        docs["gpu_time_to_accuracy"] = {"summary": summary | {"time_to_target_s": seconds}}
        docs["gpu_time_to_accuracy"]["figures"] = runs
        row = {r["target"]: r for r in targets(docs)}["ResNet-18 to 94% on one H100"]
        assert row["verdict"] == verdict
    assert row["measured"].startswith(
        "94% not reached: at best 91.00% held-out in 70.0 s (40 epochs)"
    )
    # An earlier recipe, one changed by --set, or a search the time budget ended: shown, not
    # judged (each read as today's `full`, met or not).
    for other, words in (
        ({"recipe": "cifar stem, bf16, batch 256, lr 0.2, eager"}, "not today's `full` recipe"),
        ({"overrides": ["train.epochs=99"]}, "with train.epochs=99; not today's `full`"),
        ({"search_complete": False, "time_to_target_s": None}, "the time budget ended the"),
    ):
        docs["gpu_time_to_accuracy"]["summary"] = summary | {"time_to_target_s": 50.0} | other
        row = {r["target"]: r for r in targets(docs)}["ResNet-18 to 94% on one H100"]
        assert row["verdict"] == "not measured" and words in row["measured"], row
    for other, shown in (({"device": "H200"}, "94%"), ({"target": 0.935}, "93.5%")):
        docs["gpu_time_to_accuracy"]["summary"] = summary | {"time_to_target_s": 5.0} | other
        row = {r["target"]: r for r in targets(docs)}["ResNet-18 to 94% on one H100"]
        assert row["verdict"] == "not measured" and "not an H100 run to 94%" in row["measured"]
        assert row["measured"].startswith(f"5.0 s (24 epochs) to {shown}, ")
    # An A/B against an earlier commit is shown beside the figure; it does not judge the target.
    docs["pipeline_overhead"]["summary"]["overhead_warm_median_s"] = 36.0
    docs["pipeline_overhead_ab"] = {
        "summary": {
            "ref": "abc (abc1234)",
            "this": "def5678",
            "ratio_this_over_ref": {"overhead_s": 0.7},
        }
    }
    over = {r["target"].split(",")[0]: r for r in targets(docs)}["pipeline overhead (smoke"]
    assert over["verdict"] == "NOT met"
    assert "0.7x that of abc (abc1234) at `def5678`" in over["measured"]


def test_the_accuracy_curve_has_a_point_per_validated_epoch_at_its_elapsed_time() -> None:
    history = [
        {"epoch_seconds": 10.0, "val_accuracy": 0.5},
        {"epoch_seconds": 11.0},  # not validated (train.eval_every=2): no point, but its time
        {"epoch_seconds": 12.0, "val_accuracy": 0.7},
    ]
    assert curve({"train": {"history": history}}) == [(10.0, 0.5), (33.0, 0.7)]


def test_a_result_is_dirty_for_code_changes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each benchmark rewrites its results (and the docs): those after the first were marked
    +dirty by the ones before them. Code changed since HEAD still is."""
    from benchmarks import common

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for path in ("code.py", "docs/BENCHMARKS.md", "benchmarks/results/x.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    for path in ("docs/BENCHMARKS.md", "benchmarks/results/x.json"):
        (tmp_path / path).write_text("1\n")
    clean = common.git_commit.__wrapped__()
    assert len(clean) == 7 and "+" not in clean
    (tmp_path / "code.py").write_text("1\n")
    assert common.git_commit.__wrapped__() == f"{clean}+dirty"


def test_the_features_benchmark_names_a_damaged_archive_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a missing file was one line: a damaged one was a traceback."""
    from benchmarks import features

    damaged = tmp_path / "cifar10-train-jpg.tar.gz"
    damaged.write_bytes(b"not an archive")
    monkeypatch.setattr(features, "SHARED_CIFAR", damaged)
    assert features.main(["--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: cifar10-train-jpg.tar.gz: the archive is truncated or corrupt" in err


def test_a_kept_accuracy_row_keeps_the_machine_it_ran_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of one profile keeps the other's row, and the file took the new run's machine:
    a `full` figure of one host read as measured on the next, about twice as fast or slow."""
    import json

    from benchmarks import common
    from benchmarks import time_to_accuracy as t

    for module in (common, t):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(t, "plot", lambda curves: None)  # not the committed plot
    old_host = {"cpu": "old host", "cores": 2, "avx512_bf16": True}
    kept = {"profile": "full", "wall_s": 2724.0}
    (tmp_path / "time_to_accuracy.json").write_text(
        json.dumps({"machine": old_host, "figures": [kept], "curves": {"full": []}})
    )
    new = {"profile": "quick", "machine": common.machine(), "wall_s": 600.0}
    saved = json.loads(t.save([new], {"quick": []}).read_text())
    rows = {r["profile"]: r for r in saved["figures"]}
    assert rows["full"]["machine"] == old_host and rows["quick"]["machine"] == common.machine()


def test_ab_refuses_a_ref_that_names_no_commit() -> None:
    """A usage error (exit 2, the ref named) before any worktree or pipeline starts."""
    before = git("worktree", "list")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "no-such-ref-anywhere"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "'no-such-ref-anywhere' names no commit" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = git("worktree", "list")
    assert after.stdout == before.stdout


def fake_trial(threshold: int, seconds_per_epoch: float) -> tuple[list[int], object]:
    """A run that reaches the target from `threshold` epochs on, and the epochs it was asked."""
    asked: list[int] = []

    def trial(epochs: int) -> dict:
        asked.append(epochs)
        return {
            "epochs": epochs,
            "train_s": epochs * seconds_per_epoch,
            "eval_s": 0.0,
            "val_accuracy": 0.95 if epochs >= threshold else 0.9,
        }

    return asked, trial


def test_gpu_search_brackets_the_shortest_schedule_that_reaches_the_target() -> None:
    asked, trial = fake_trial(24, 0.01)
    runs, complete = gpu.search([12, 16, 20, 24, 32, 40], 0.94, 300.0, trial)
    assert asked == [20, 32, 24] and complete  # the middle, up after a miss, down after a hit
    assert [r["met"] for r in runs] == [False, True, True]
    asked, trial = fake_trial(99, 0.01)
    runs, complete = gpu.search([12, 16, 20], 0.94, 300.0, trial)
    assert [r["met"] for r in runs] == [False, False] and complete
    assert asked == [16, 20]


def test_gpu_search_starts_no_run_the_budget_cannot_hold() -> None:
    """After one 20-epoch run at 10 s an epoch, 32 epochs (~350 s) do not fit in 300 s."""
    asked, trial = fake_trial(99, 10.0)
    _, complete = gpu.search([12, 16, 20, 24, 32, 40], 0.94, 300.0, trial)
    assert asked == [20] and not complete


def test_gpu_benchmark_says_it_skips_without_cuda(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)  # as on CI's machines
    assert gpu.main([]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_gpu_benchmark_refuses_bad_input_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv, problem in (
        (["--schedules", "12,x"], "'12,x': expected epoch counts"),
        (["--device", "tpu9"], "'tpu9': expected cuda, cuda:N or cpu"),
        (["--device", "meta"], "'meta': expected cuda, cuda:N or cpu"),
        (["--target", "1.5"], "'1.5': expected a number in (0, 1]"),
        (["--budget-s", "0"], "'0': expected a number in (0, inf]"),
    ):
        with pytest.raises(SystemExit) as exit_:
            gpu.main(argv)
        assert exit_.value.code == 2 and problem in capsys.readouterr().err
    assert gpu.main(["--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert gpu.main(["--data", str(tmp_path / "none.tar.gz")]) == 2
    assert "none.tar.gz: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("closes", "message"),
    [
        (False, "no answer within 1 s"),
        # A server that died mid-run: a 40-line traceback ending in an IndexError.
        (True, "the server closed the connection without a whole answer"),
    ],
)
def test_loadgen_fails_on_a_server_that_stops_answering(closes: bool, message: str) -> None:
    """It waited for the answer for good; now for --timeout, then exits with one line."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        if closes:

            def close_each() -> None:
                with contextlib.suppress(OSError):  # the listener closed: the test is over
                    while True:
                        listener.accept()[0].close()

            threading.Thread(target=close_each, daemon=True).start()
        port = str(listener.getsockname()[1])
        # 1 channel: PIL took no (H, W, 1) array for V1's PNG, a traceback before any request.
        flags = ["--seconds", "0.5", "--warmup", "0.1", "--timeout", "1", "--protocol", "v1"]
        flags += ["--shape", "28", "28", "1"]
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.loadgen", "--port", port, "--model", "m", *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert out.returncode == 1 and out.stderr == f"error: {message}\n", out.stderr


def test_a_failed_pipeline_run_says_why(tmp_path: Path) -> None:
    """The benchmark threw the run's own words away: 'failed (exit 2)' and nothing more."""
    from benchmarks.runs import run_pipeline

    with pytest.raises(SystemExit) as failed:
        run_pipeline(["--profile", "qiuck"], tmp_path / "state")
    assert "failed (exit 2)" in str(failed.value) and "invalid choice: 'qiuck'" in str(failed.value)
