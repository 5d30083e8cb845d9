"""The config tree: profiles, precedence, validation messages, and credentials kept out of files."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml

from data.sources import EXPECTED
from pipelines.cli import parse_set
from pipelines.config import (
    PROFILES,
    DatasetName,
    TrainConfig,
    config_from_json,
    config_overrides,
    describe_fields,
    for_cluster,
    load_config,
    public_json,
)
from pipelines.errors import ConfigError


def test_profiles_differ_and_validate() -> None:
    configs = {name: load_config(name, environ={}) for name in PROFILES}
    assert configs["quick"].train == load_config(environ={}).train  # quick is the default
    assert (
        configs["smoke"].train.epochs < configs["quick"].train.epochs < configs["full"].train.epochs
    )
    assert {c.profile for c in configs.values()} == set(PROFILES)


def test_precedence_flags_over_env_over_file_over_profile(tmp_path: Path) -> None:
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("train:\n  epochs: 7\n  lr: 0.05\nmlflow:\n  tracking_uri: http://file\n")
    cfg = load_config(
        "smoke",
        yaml_file,
        overrides={"train.epochs": 9},
        environ={"MLFLOW_TRACKING_URI": "http://env", "MINIO_ACCESS_KEY": "AKIA-TEST-KEY"},
    )
    assert cfg.train.epochs == 9  # flag beats file
    assert cfg.train.lr == 0.05  # file beats profile
    assert cfg.mlflow.tracking_uri == "http://env"  # env beats file
    assert cfg.storage.access_key.get_secret_value() == "AKIA-TEST-KEY"
    assert "AKIA-TEST-KEY" not in str(cfg.public_dict())  # masked wherever the config is printed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.epochs": 0}, r"train\.epochs=0: Input should be greater than or equal to 1"),
        ({"train.precision": "fp8"}, r"train\.precision='fp8': Input should be 'auto', 'fp32'"),
        ({"dataset.name": "svhn"}, r"dataset\.name='svhn': Input should be 'cifar10'"),
        ({"train.epoch": 3}, r"train\.epoch: unknown setting"),
        ({"serving.model_name": "Bad_Name"}, r"serving\.model_name='Bad_Name'"),
        ({"serving.model_name": "2024-resnet18"}, "an InferenceService name is expected"),
        ({"serving.model_name": "m" * 54}, "1-53 lowercase letters"),
        # Before, the first request to S3 failed with its bare "Bad request", as exit 1.
        (
            {"storage.buckets.raw": "Raw_Data"},
            r"buckets\.raw='Raw_Data': an S3 bucket name is expected: 3-63 lowercase",
        ),
        # YAML's .inf passed every bound: the server that made it an int crashed at start.
        ({"serving.max_body_mb": float("inf")}, r"max_body_mb=inf: Input should be a finite"),
        ({"train.lr": float("nan")}, r"train\.lr=nan: Input should be a finite number"),
        # The seeds derived from it overflowed torch's int64 in the trainer: a traceback, twice.
        ({"train.seed": 10**15}, r"train\.seed=1000000000000000: Input should be less than or"),
        # In models:/NAME@ALIAS, a '/' made `serve` blame a --model-uri never given.
        ({"gate.alias": "a/b"}, r"gate\.alias='a/b': an MLflow alias is expected"),
        # Another scheme was waited on as a server for mlflow.wait_s (90 s), then refused.
        ({"mlflow.tracking_uri": "foo://bar"}, r"tracking_uri='foo://bar': the http:// or https"),
        ({"image": "repo/img:latest"}, r"image='repo/img:latest'.*pinned tag, not latest"),
        ({"image": "repo/img"}, r"image='repo/img'.*pinned tag"),
    ],
)
def test_bad_values_name_field_value_and_rule(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


@pytest.mark.parametrize(
    ("variable", "field", "rule"),
    [
        ("MLFLOW_TRACKING_URI", "mlflow.tracking_uri", "with no user or password in it"),
        ("MINIO_ENDPOINT", "storage.endpoint", "host and port only"),
    ],
)
def test_a_url_holding_a_password_is_refused_without_showing_it(
    variable: str, field: str, rule: str
) -> None:
    """A password in the tracking URL was printed in the failure, written to the run's files
    and the --json report, and would have been logged as an MLflow param; the steps' health
    check took `user:password@host` for a host name and waited 90 s."""
    with pytest.raises(ConfigError) as err:
        load_config(environ={variable: "http://alice:hunter2pw@127.0.0.1:5000"})
    assert f"{field}='http://***@127.0.0.1:5000' (from {variable})" in str(err.value)
    assert rule in str(err.value) and "hunter2pw" not in str(err.value)


def test_credentials_never_come_from_files_or_flags(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("storage:\n  secret_key: hunter2\n")
    with pytest.raises(ConfigError, match="credentials come only from the environment"):
        load_config(config_file=leaky, environ={})
    with pytest.raises(ConfigError, match="only from the environment"):
        load_config(overrides={"storage.access_key": "x"}, environ={})


@pytest.mark.parametrize(
    ("text", "where_and_why"),
    [
        ("train: [unclosed\n", "line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        # PyYAML kept the last of two keys silently: `epochs: 3` above looked in force.
        (
            "train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n",
            "line 4, column 3: 'epochs' is set twice in one section: keep one",
        ),
    ],
    ids=["unclosed", "key-twice"],
)
def test_bad_yaml_is_one_line_naming_where(tmp_path: Path, text: str, where_and_why: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as failed:
        load_config(config_file=bad, environ={})
    # One line: where and what, not PyYAML's eight with carets.
    assert str(failed.value) == f"config file {bad} is not valid YAML at {where_and_why}"


def test_a_missing_file_a_key_set_twice_and_an_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="'epochs' is set twice"):
        parse_set(["train={epochs: 2, epochs: 3}"])
    with pytest.raises(ConfigError, match="profile='huge': choose one of smoke, quick, full"):
        load_config("huge", environ={})


def test_unreadable_config_files_name_the_path(tmp_path: Path) -> None:
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"train:\n  epochs: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(config_file=tmp_path, environ={})
    with pytest.raises(ConfigError, match=f"config file {binary} is not UTF-8 text"):
        load_config(config_file=binary, environ={})
    with pytest.raises(ConfigError, match=r"config file ~no-such-user-x/c\.yaml: "):
        load_config(config_file=Path("~no-such-user-x/c.yaml"), environ={})
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"config file {deep} nests too deeply"):
        load_config(config_file=deep, environ={})
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("dataset:\n  id: 2024\n")
    with pytest.raises(ConfigError, match=r"dataset\.id=2024: .*string \(quote it in a YAML"):
        load_config(config_file=numbers, environ={})


def test_a_boolean_is_no_number() -> None:
    """YAML reads true as a boolean, which pydantic would take for 1 in a number field."""
    for key in ("train.epochs", "dataset.seed", "train.lr", "dataset.image_size"):
        with pytest.raises(ConfigError) as refused:
            load_config("smoke", overrides={key: True}, environ={})
        assert str(refused.value) == f"{key}=True: a number is expected, not true or false"
    assert load_config("smoke", overrides={"train.hflip": True}, environ={}).train.hflip is True


def test_image_size_is_refused_where_it_would_be_ignored() -> None:
    # Named from verify-data's table of fixed shapes, so the config's list cannot drift from it.
    for name in EXPECTED:
        overrides = {"dataset.name": name, "dataset.image_size": 32}
        with pytest.raises(ConfigError) as refused:
            load_config("smoke", overrides=overrides, environ={})
        assert str(refused.value) == (
            "dataset.image_size=32 resizes imagefolder and synthetic images only; "
            f"{name} images have one size: unset dataset.image_size"
        )
    for name in sorted(set(get_args(DatasetName)) - set(EXPECTED)):
        overrides = {"dataset.name": name, "dataset.image_size": 24}
        assert load_config("smoke", overrides=overrides, environ={}).dataset.image_size == 24


def test_the_model_name_follows_the_dataset_unless_set() -> None:
    """Each dataset's models get their own registry name, so an MNIST run does not meet the
    CIFAR-10 champion at the gate, which refuses a champion of another task."""

    def name(**overrides: object) -> str:
        return load_config("smoke", overrides=overrides, environ={}).model_name

    assert name() == "cifar10-resnet18"
    assert name(**{"dataset.name": "mnist"}) == "mnist-resnet18"
    assert name(**{"dataset.name": "imagefolder", "dataset.id": "flowers"}) == "flowers-resnet18"
    # An id that is no DNS label: '.' and '_' become '-', and a long one is cut to fit. They
    # fell back to the format's name, which every such dataset then shared, with its champion.
    names = {
        "my_photos": "my-photos-resnet18",
        "pets.v2": "pets-v2-resnet18",
        "x" * 60: "x" * 44 + "-resnet18",  # 53 characters: the Service is NAME-predictor
        "a_" + "y" * 60: "a-" + "y" * 42 + "-resnet18",
        "2024": "imagefolder-2024-resnet18",  # KServe's names start with a letter
    }
    for dataset_id, expected in names.items():
        assert name(**{"dataset.name": "imagefolder", "dataset.id": dataset_id}) == expected
    assert name(**{"dataset.name": "mnist", "serving.model_name": "digits"}) == "digits"
    unset = parse_set(["serving.model_name="])
    assert name(**unset, **{"dataset.name": "mnist"}) == "mnist-resnet18"
    # The config prints it unset, so a dumped file with another dataset follows that dataset.
    assert load_config("smoke", environ={}).public_dict()["serving"]["model_name"] is None


def test_set_gives_text_fields_the_text_typed() -> None:
    """YAML reads 4, 2024 and on as numbers and a boolean; a text field wants them as typed."""
    typed = [
        "cluster.train_resources.cpu=4",
        "dataset.id=2024",
        "mlflow.experiment=on",
        'serving.model_name="on"',  # config_overrides' JSON form: the quotes go
        "dataset.source=@raw #2 &x",  # not YAML at all: no comment, no anchor
        "serving.backend=torch",
        "train.epochs=3",  # and the other fields are YAML as before
        "gate.force_promote=on",
        "dataset.image_size=",  # empty: unset
    ]
    cfg = load_config(overrides=parse_set(typed), environ={})
    assert cfg.cluster.train_resources.cpu == "4" and cfg.dataset.id == "2024"
    assert cfg.mlflow.experiment == "on" and cfg.serving.model_name == "on"
    assert cfg.dataset.source == "@raw #2 &x" and cfg.train.epochs == 3
    assert cfg.gate.force_promote is True and cfg.dataset.image_size is None
    with pytest.raises(ConfigError, match=r"--set train\.lr=@x: not a YAML value"):
        parse_set(["train.lr=@x"])
    assert parse_set(["dataset.source=null", "dataset.id=~"]) == {
        "dataset.source": None,
        "dataset.id": None,
    }


def test_profile_is_chosen_only_with_the_flag(tmp_path: Path) -> None:
    for name in ("bogus", "full"):  # unknown, or a label without the profile's values
        with pytest.raises(ConfigError, match=f"profile={name}: choose the profile with --prof"):
            load_config(overrides={"profile": name}, environ={})
    dumped = tmp_path / "smoke.yaml"  # what `run.py config --profile smoke` prints
    dumped.write_text(yaml.safe_dump(load_config("smoke", environ={}).public_dict()))
    assert load_config("smoke", dumped, environ={}) == load_config("smoke", environ={})
    with pytest.raises(ConfigError, match="sets profile: smoke, but --profile is quick"):
        load_config("quick", dumped, environ={})
    with pytest.raises(ConfigError, match=r"profile='bogus': Input should be 'smoke'"):
        config_from_json('{"profile": "bogus"}', environ={})
    assert not any(line.strip().startswith("profile ") for line in describe_fields())


def test_numbers_read_as_the_decimals_they_show(tmp_path: Path) -> None:
    """PyYAML reads YAML 1.1: `010` was 8 (octal), `1:30` 90 (base 60), `0x50` 80, in a flag,
    a file and a pod's `--set` alike."""
    assert parse_set(["train.epochs=010", "train.lr=1e-3", "train.seed=+7"]) == {
        "train.epochs": 10,
        "train.lr": 0.001,
        "train.seed": 7,
    }
    for text in ("1:30", "0x50", "0b11", "0o7"):
        with pytest.raises(ConfigError, match=f"train.epochs='{text}': Input should be a valid"):
            load_config(overrides=parse_set([f"train.epochs={text}"]), environ={})
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  epochs: 010\n  flip_tta: off\n  lr: .5\n")
    train = load_config(config_file=path, environ={}).train
    assert (train.epochs, train.flip_tta, train.lr) == (10, False, 0.5)


def test_a_section_given_whole_keeps_the_profiles_other_values() -> None:
    """`--set 'train={epochs: 2}'` replaced the section: smoke's batch size and lr were lost."""
    smoke = load_config("smoke", environ={}).train
    cfg = load_config("smoke", overrides=parse_set(["train={epochs: 2}"]), environ={})
    assert cfg.train == smoke.model_copy(update={"epochs": 2})


def test_a_bad_value_from_the_environment_names_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"endpoint='minio:9000' \(from MINIO_ENDPOINT\): the "):
        load_config(environ={"MINIO_ENDPOINT": "minio:9000"})
    # Overridden by a flag, the variable is not what was wrong.
    with pytest.raises(ConfigError, match=r"endpoint='x:1': the http"):
        load_config(overrides={"storage.endpoint": "x:1"}, environ={"MINIO_ENDPOINT": "x:2"})


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_state_dir_is_refused_not_the_current_folder(empty: str) -> None:
    """Path("") is ".": `--state-dir ''` spread the state over the current folder."""
    with pytest.raises(ConfigError, match=r"state_dir='\s*': is empty: pass a folder"):
        load_config(overrides={"state_dir": empty}, environ={})


def test_state_dir_expands_the_home_folder() -> None:
    # `--state-dir=~/x` reaches us unexpanded: the shell expands ~ only at a word's start.
    cfg = load_config(overrides={"state_dir": "~/mlops-state"}, environ={})
    assert cfg.state_dir == Path.home() / "mlops-state"


def test_every_field_is_described() -> None:
    lines = describe_fields()
    epochs = TrainConfig.model_fields["epochs"].default
    assert any(line.strip().startswith(f"train.epochs (default {epochs})") for line in lines)
    assert all(not line.endswith(": None") for line in lines), "a field lacks a description"


def test_the_stores_urls_follow_the_namespace_unless_set() -> None:
    """--namespace alone left every pod calling the mlops namespace's stores, whose
    NetworkPolicies admit their own namespace's pods only."""
    cluster = load_config(overrides={"cluster.namespace": "team-a"}, environ={}).cluster
    assert cluster.s3_endpoint == "http://minio.team-a.svc.cluster.local:9000"
    assert cluster.mlflow_uri == "http://mlflow.team-a.svc.cluster.local:5000"
    given = {"cluster.namespace": "team-a", "cluster.s3_endpoint": "http://s3.example:9000"}
    cluster = load_config(overrides=given, environ={}).cluster
    assert cluster.s3_endpoint == "http://s3.example:9000"  # set: kept
    assert cluster.mlflow_uri == "http://mlflow.team-a.svc.cluster.local:5000"
    pod = for_cluster(load_config(overrides={"cluster.namespace": "team-a"}, environ={}))
    assert pod.storage.endpoint == "http://minio.team-a.svc.cluster.local:9000"


def test_pods_resolve_the_submitters_config_from_profile_and_overrides() -> None:
    """config_overrides + --profile rebuild the same config; for_cluster points at the cluster."""
    env = {"MINIO_ENDPOINT": "http://127.0.0.1:9", "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"}
    cfg = load_config(
        "smoke",
        overrides={"train.lr": 0.05, "dataset.name": "mnist", "serving.model_name": "on"},
        environ=env,
    )
    sets = config_overrides(cfg)
    assert sets == {"train.lr": "0.05", "dataset.name": '"mnist"', "serving.model_name": '"on"'}
    rebuilt = load_config(
        "smoke", overrides={k: yaml.safe_load(v) for k, v in sets.items()}, environ=env
    )
    assert public_json(rebuilt) == public_json(cfg)  # "on" stays a string, not YAML's True
    pod = for_cluster(cfg)
    assert pod.storage.endpoint == cfg.cluster.s3_endpoint
    assert pod.mlflow.tracking_uri == cfg.cluster.mlflow_uri
    assert pod.runtime == "kubernetes" and cfg.runtime == "local"
    assert '"access_key"' not in public_json(pod) and '"secret_key"' not in public_json(pod)
