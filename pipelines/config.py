"""The one config tree: typed, validated fields, named profiles, and how values are loaded."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipelines.errors import ConfigError

DatasetName = Literal["cifar10", "mnist", "imagefolder", "synthetic"]
# Official datasets, whose images have one size: dataset.image_size resizes the others only.
# The same names as verify-data's table of shapes (data.sources.EXPECTED; a test holds them
# equal), kept apart so that the config does not import the readers.
FIXED_SIZE_DATASETS = frozenset({"cifar10", "mnist"})
# Datasets whose classes change when an image is mirrored (digits): never flipped by default.
UNMIRRORED_DATASETS = frozenset({"mnist"})
# Kubernetes' rule for most object names (a namespace, a Service): what an error then says.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# KServe's rule for an InferenceService name (its webhook's: a letter first), at most 53
# characters, as its Service is NAME-predictor: a name outside it was compiled, submitted and
# trained, then refused at deploy.
ISVC_NAME = r"^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$"
IMAGE_UID = 1000  # the image's non-root user and group (infrastructure/Dockerfile)
# S3's rule for bucket names (MinIO's too): a name outside it failed only at the first
# request, as the server's bare "Bad request".
S3_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# A tracking server's URL: the steps log through its REST API and its artifact proxy. Another
# scheme (a typo, a file store) was waited on as a server for mlflow.wait_s, then refused. No
# user or password in it: the URL is printed, stored and logged as a param, and the steps'
# health check took `user:password@host` for a host name and waited mlflow.wait_s in vain.
HTTP_URL = r"^https?://[^/@\s]+(/\S*)?$"
# MLflow's rule for a registry alias, which also keeps models:/NAME@ALIAS one URI.
REGISTRY_ALIAS = r"^[A-Za-z0-9_-]{1,255}$"
# An S3 endpoint: scheme, host and port, no path (the client puts the bucket there).
S3_ENDPOINT = r"^https?://[^/@\s]+/?$"
DATASET_ID = r"^[a-z0-9][a-z0-9._-]{0,62}$"
PATTERN_WORDS = {
    DNS_LABEL: "a DNS-1123 label is expected: 1-63 lowercase letters, digits and '-', "
    "starting and ending with a letter or digit",
    ISVC_NAME: "an InferenceService name is expected: 1-53 lowercase letters, digits and '-', "
    "starting with a letter and ending with a letter or digit (KServe's rule; its Service is "
    "NAME-predictor)",
    S3_BUCKET: "an S3 bucket name is expected: 3-63 lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
    REGISTRY_ALIAS: "an MLflow alias is expected: letters, digits, '_' and '-'",
    HTTP_URL: "the http:// or https:// URL of an MLflow tracking server is expected, with no "
    "user or password in it (MLflow reads those from MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD)",
    S3_ENDPOINT: "the http:// or https:// URL of an S3 server is expected, host and port "
    "only (e.g. http://minio.mlops:9000; the keys come from MINIO_ACCESS_KEY and "
    "MINIO_SECRET_KEY)",
    DATASET_ID: "1-63 lowercase letters, digits, '.', '_' and '-', starting with a letter or "
    "digit, is expected",
}
ProfileName = Literal["smoke", "quick", "full"]  # the functions in PROFILES, below
ServingBackend = Literal["onnxruntime", "torch"]

# Environment variables that feed the config. Credentials come only from here, never from a
# file or a flag, so they never land in a committed YAML file or a process listing.
ENV_VARS = {
    "MINIO_ENDPOINT": "storage.endpoint",
    "MINIO_ACCESS_KEY": "storage.access_key",
    "MINIO_SECRET_KEY": "storage.secret_key",
    "MINIO_REGION": "storage.region",
    "MLFLOW_TRACKING_URI": "mlflow.tracking_uri",
    "MLOPS_STATE_DIR": "state_dir",  # the image sets it: a pod's root filesystem is read-only
}
SECRET_FIELDS = {"storage.access_key", "storage.secret_key"}


class _Section(BaseModel):
    # No inf or nan in a number: `--set serving.max_body_mb=.inf` (YAML reads it so) passed
    # every bound and crashed the server that turned it into an int.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic takes true for 1 in a number field: `--set train.epochs=true` (YAML reads it
        # as a boolean) would train one epoch without a word.
        kinds = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and {int, float} & {kinds, *get_args(kinds)}:
            raise ValueError("a number is expected, not true or false")
        return value


class DatasetConfig(_Section):
    """Which dataset to use and how to split it."""

    name: DatasetName = Field("cifar10", description="Dataset format.")
    source: str | None = Field(
        None,
        description="Local source: a tarball (or an ImageFolder .zip), an image folder or an "
        "IDX folder. Unset: use the copy already in the store, else the cache, else download "
        "(cifar10, mnist) or generate (synthetic).",
    )
    id: str | None = Field(
        None,
        pattern=DATASET_ID,
        description="Object-store prefix under raw-data/ and processed-data/. Unset: the name.",
    )
    download: bool = Field(
        True, description="Allow downloading the official archive when it is not in the store."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of the train split held out as val (stratified)."
    )
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Share of train carved out as test, only when the source has no test split.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the train/val/test split; for `synthetic`, of the images too.",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Resize images to this square size (imagefolder, synthetic). Unset: every "
        "image must share one size.",
    )
    synthetic_per_class: int = Field(
        200, ge=10, description="Synthetic data: train images per class (test gets a fifth)."
    )

    @property
    def key(self) -> str:
        return self.id or self.name

    def source_path(self) -> Path | None:
        """dataset.source as a path that exists on this machine, or None when unset."""
        if not self.source:
            return None
        path = Path(self.source).expanduser()
        if not path.exists():
            raise ConfigError(f"dataset.source={self.source!r}: no such file or folder")
        return path

    @model_validator(mode="after")
    def _size_applies(self) -> DatasetConfig:
        if self.image_size is not None and self.name in FIXED_SIZE_DATASETS:
            raise ValueError(
                f"image_size={self.image_size} resizes imagefolder and synthetic images only; "
                f"{self.name} images have one size: unset dataset.image_size"
            )
        return self


class Buckets(_Section):
    """Bucket names, as in the reference design."""

    raw: str = Field(
        "raw-data", pattern=S3_BUCKET, description="Bucket of the raw, as-delivered datasets."
    )
    processed: str = Field(
        "processed-data", pattern=S3_BUCKET, description="Bucket of the processed shards."
    )
    models: str = Field(
        "models", pattern=S3_BUCKET, description="Bucket of the trained models and checkpoints."
    )
    mlflow: str = Field(
        "mlflow", pattern=S3_BUCKET, description="Bucket of the MLflow artifact store."
    )

    def pipeline(self) -> list[str]:
        """The buckets the steps read and write themselves; MLflow's goes through its server."""
        return [self.raw, self.processed, self.models]


class StorageConfig(_Section):
    """The S3 / MinIO object store."""

    endpoint: str | None = Field(
        None,
        pattern=S3_ENDPOINT,
        description="S3 endpoint URL (env MINIO_ENDPOINT). Unset: start an embedded server on "
        "127.0.0.1 with random keys, storing under the state dir.",
    )
    access_key: SecretStr | None = Field(None, description="Access key (env MINIO_ACCESS_KEY).")
    secret_key: SecretStr | None = Field(None, description="Secret key (env MINIO_SECRET_KEY).")
    region: str = Field("us-east-1", description="S3 region (env MINIO_REGION).")
    timeout_s: float = Field(
        10.0, gt=0, description="Connect and read timeout of one S3 request, in seconds."
    )
    buckets: Buckets = Field(default_factory=Buckets)


class FeaturesConfig(_Section):
    """The feature-engineering step."""

    shard_size: int = Field(10_000, ge=1, description="Images per processed shard file.")


class TrainConfig(_Section):
    """ResNet-18 training."""

    arch: Literal["resnet18"] = Field("resnet18", description="Network architecture.")
    stem: Literal["cifar", "imagenet", "s2", "s1pool"] = Field(
        "s2",
        description="cifar: 3x3 stride-1 conv, no maxpool; imagenet: 7x7 stride-2 conv + "
        "maxpool; s2: 3x3 stride-2 conv, no maxpool; s1pool: 3x3 stride-1 conv + 2x2 maxpool.",
    )
    epochs: int = Field(8, ge=1, le=1000, description="Training epochs.")
    batch_size: int = Field(256, ge=1, description="Global batch size, summed over all ranks.")
    lr: float = Field(0.2, gt=0, le=10, description="Peak learning rate of the schedule.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD Nesterov momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay.")
    label_smoothing: float = Field(0.2, ge=0, lt=1, description="Cross-entropy label smoothing.")
    crop_pad: int = Field(
        2,
        ge=0,
        le=32,
        description="Pixels of zero padding around each training image before the random crop "
        "back to its size (0: no crop).",
    )
    cutout: int = Field(
        0,
        ge=0,
        le=32,
        description="Side in pixels of a square zeroed at a random centre of each training image, "
        "after the crop and flip (Cutout; it may fall partly off the edge); 0: none.",
    )
    workers: int = Field(
        1, ge=1, le=64, description="DDP processes locally; PyTorchJob replicas on a cluster."
    )
    max_restarts: int = Field(
        1,
        ge=0,
        le=10,
        description="Restarts of the whole worker group after a failure, in a local run (one "
        "local worker: none after a config error); on a cluster, cluster.backoff_limit bounds "
        "the PyTorchJob's restarts.",
    )
    nproc_per_node: int = Field(1, ge=1, le=16, description="Processes per PyTorchJob replica.")
    seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,  # the per-epoch seeds derived from it must fit torch's int64
        description="Seed of the initial weights, shuffling and augmentation.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the hardware computes bf16 natively (a CPU with "
        "AVX512-BF16 or AMX, a GPU from Ampere on), else fp32 on a CPU and fp16 on a GPU; or "
        "fp32, bf16, fp16 (CUDA only) as given.",
    )
    hflip: bool | None = Field(
        None,
        description="Mirror images left-right: random flips in training, and flip_tta. Unset: "
        f"on, except for {', '.join(sorted(UNMIRRORED_DATASETS))} (mirrored digits are not "
        "digits).",
    )
    alternate_flips: bool = Field(
        True,
        description="With hflip: mirror a seeded random half of the images in even epochs and "
        "the other half in odd ones, so any two epochs in a row show each image both ways; "
        "false: a fresh random half every epoch.",
    )
    flip_tta: bool = Field(
        True,
        description="Average the logits of each image and its mirror at evaluation and in "
        "serving (twice the inference cost); only where hflip is on.",
    )
    eval_every: int = Field(
        1,
        ge=1,
        le=1000,
        description="Validate after every N-th epoch and after the last: the val curve in "
        "MLflow. A pass (one forward over the val split) costs 3-4% of a CIFAR-10 epoch's "
        "training; a larger N trades points of the curve for that time, and no weight.",
    )


class GateConfig(_Section):
    """The verify-model quality gate."""

    min_accuracy: float = Field(
        0.5, ge=0, le=1, description="Minimum test accuracy (0-1) a model needs to be promoted."
    )
    alias: str = Field(
        "champion",
        pattern=REGISTRY_ALIAS,
        description="Registry alias of the model in service.",
    )
    force_promote: bool = Field(
        False, description="Promote even when the current champion scores higher."
    )


class ServingConfig(_Section):
    """The KServe model server."""

    model_name: str | None = Field(
        None,
        pattern=ISVC_NAME,
        description="Registered model and InferenceService name (KServe's: a letter first, 53 "
        "characters at most). Unset: "
        "DATASET-ARCH from dataset.id or dataset.name and train.arch (cifar10-resnet18), so "
        "each dataset's models have their own versions and champion.",
    )
    port: int = Field(8080, ge=1, le=65535, description="HTTP port of the model server.")
    top_k: int = Field(3, ge=1, description="Classes returned per image, most probable first.")
    max_instances: int = Field(64, ge=1, description="Largest batch one request may carry.")
    max_body_mb: float = Field(
        64.0,
        gt=0,
        description="Largest request body, in MB (10^6 bytes); a larger one is refused with a 413 "
        "before it is read, from its Content-Length or as its chunks arrive.",
    )
    max_decode_pixels: int = Field(
        4_194_304,
        ge=1,
        description="Most pixels the server decodes of one PNG or JPEG, which it resizes to the "
        "model's input as training resizes (a JPEG decodes at up to 1/8 of its size first): a "
        "2048x2048 PNG takes about 0.1 s here, during which no other request is parsed.",
    )
    threads: int = Field(
        1, ge=1, description="Model-server intra-op threads (1 avoids latency spikes on 2 cores)."
    )
    max_batch: int = Field(
        64,
        ge=1,
        description="Most images one forward pass serves: concurrent requests are combined up "
        "to this (1 disables micro-batching; a larger request still runs, alone).",
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long a batch may wait for more requests after its first one, in ms, "
        "and only under concurrent load (0: batch only what queued during the last forward).",
    )
    max_queued_images: int = Field(
        1024,
        ge=1,
        description="Images waiting (to be decoded, or for a forward pass) beyond which a "
        "request gets a 503 "
        "(shed load at once rather than queue it without bound; a request into an empty queue "
        "always runs).",
    )
    backend: ServingBackend = Field(
        "onnxruntime",
        description="What runs the forward pass: onnxruntime (the PyTorch model, its weights "
        "loaded from safetensors, exported to an in-memory ONNX graph at start-up, about 1 s) "
        "or torch (eager PyTorch). See docs/BENCHMARKS.md for the latency of each.",
    )


class MlflowConfig(_Section):
    """MLflow tracking."""

    tracking_uri: str | None = Field(
        None,
        pattern=HTTP_URL,
        description="Tracking server (env MLFLOW_TRACKING_URI). Unset: `run.py` starts a local "
        "one for its run; the train and verify-model steps run alone need it set.",
    )
    experiment: str = Field("image-classifier", description="Experiment name.")
    ui_port: int = Field(5000, ge=1, le=65535, description="Port of `make mlflow-ui`.")
    wait_s: float = Field(
        90.0, gt=0, description="How long a step waits for the tracking server to be healthy."
    )
    telemetry: bool = Field(
        False,
        description="MLflow's usage telemetry, which every process that imports mlflow sends to "
        "its vendor. Off: MLFLOW_DISABLE_TELEMETRY=true in the steps, the trainer and the "
        "tracking server, so a run calls nothing outside the cluster or this machine.",
    )


class Resources(_Section):
    """Requests (= limits, so the pods are Guaranteed QoS) of one container."""

    cpu: str = Field("2", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU, e.g. 2 or 500m.")
    memory: str = Field("8Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$", description="Memory, e.g. 8Gi.")
    gpu: int = Field(0, ge=0, le=8, description="nvidia.com/gpu per pod.")


NAMESPACE = "mlops"
# The stores' Services as the overlays install them (infrastructure/base): name and port.
STORES = {"s3_endpoint": ("minio", 9000), "mlflow_uri": ("mlflow", 5000)}


def store_url(key: str, namespace: str) -> str:
    service, port = STORES[key]
    return f"http://{service}.{namespace}.svc.cluster.local:{port}"


class ClusterConfig(_Section):
    """Where and how the pipeline runs on Kubernetes (Argo, the Training Operator, KServe)."""

    namespace: str = Field(
        NAMESPACE,
        pattern=DNS_LABEL,
        description="Kubernetes namespace of the workflows, jobs and services.",
    )
    service_account: str = Field(
        "mlops-pipeline",
        description="ServiceAccount of the training pods (which mount no token) and of a KFP "
        "run's pods, which share one account for all they call.",
    )
    executor_service_account: str = Field(
        "mlops-executor",
        description="ServiceAccount of Argo's executor in each step pod (task results; the "
        "train step's PyTorchJob). The steps' own containers mount no token.",
    )
    deploy_service_account: str = Field(
        "mlops-deployer",
        description="ServiceAccount of the Argo deploy step's container: InferenceServices.",
    )
    serving_service_account: str = Field(
        "mlops-kserve", description="ServiceAccount of the predictor (its S3 Secret)."
    )
    s3_secret: str = Field(
        "mlops-s3", description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    )
    s3_endpoint: str = Field(
        store_url("s3_endpoint", NAMESPACE),
        description="S3 endpoint inside the cluster (default: MinIO's Service in namespace).",
    )
    mlflow_uri: str = Field(
        store_url("mlflow_uri", NAMESPACE),
        description="MLflow inside the cluster (default: its Service in namespace).",
    )

    @model_validator(mode="before")
    @classmethod
    def _stores_in_namespace(cls, data: Any) -> Any:
        """The stores are the overlay's, installed in the pipeline's namespace: a namespace
        set alone left the pods calling mlops's stores, whose NetworkPolicies admit their own
        namespace's pods only. Set either URL for stores elsewhere."""
        if isinstance(data, dict) and isinstance(ns := data.get("namespace", NAMESPACE), str):
            # null is unset too: `run.py config` writes it so, for a file that follows.
            given = {k: v for k, v in data.items() if not (k in STORES and v is None)}
            data = {**{key: store_url(key, ns) for key in STORES}, **given}
        return data

    mlflow_secret: str = Field(
        "mlops-mlflow-client",
        description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, read when "
        "it exists (the production overlay's MLflow has basic auth; the local one has none).",
    )
    serving_mode: Literal["Standard", "Knative"] = Field(
        "Standard",
        description="KServe deployment mode: Standard (a Deployment; needs only cert-manager) or "
        "Knative (serverless, scale to zero; the predictor's pod securityContext, which Pod "
        "Security 'restricted' asks for, needs Knative's kubernetes.podspec-securitycontext "
        "feature flag on).",
    )
    step_resources: Resources = Field(
        default_factory=lambda: Resources(cpu="1", memory="4Gi"),
        description="Data, verify and deploy steps.",
    )
    train_resources: Resources = Field(
        default_factory=Resources, description="Each PyTorchJob replica."
    )
    serving_resources: Resources = Field(
        default_factory=lambda: Resources(cpu="1", memory="2Gi"), description="The predictor."
    )
    retries: int = Field(2, ge=0, le=10, description="Retries of the data, verify, deploy steps.")
    active_deadline_s: int = Field(
        6 * 3600, ge=60, description="Deadline of the whole workflow and of the PyTorchJob."
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        description="Restarts of the training (a killed pod) before the PyTorchJob fails: its "
        "backoffLimit, which the Training Operator applies only under OnFailure, and the count "
        "of starts the trainer keeps beside its checkpoints, which bounds them under ExitCode.",
    )
    ready_s: int = Field(
        900, ge=10, description="How long deploy waits for the InferenceService to be Ready."
    )


class PipelineConfig(_Section):
    """The whole pipeline: every step and builder derives its settings from this tree."""

    profile: ProfileName = Field(
        "quick",
        description="Name of the profile this config started from: chosen with --profile, "
        "never with --set or in a file.",
    )
    state_dir: Path = Field(
        Path(".mlops"),
        description="Local state: embedded S3 data, MLflow db, caches (env MLOPS_STATE_DIR).",
    )
    runtime: Literal["local", "kubernetes"] = Field(
        "local",
        description="Where train and deploy run their work. local: torchrun (a plain process "
        "for one worker) and a model server on this machine; kubernetes: a PyTorchJob "
        "(TrainingClient) and an InferenceService (KServeClient), as `submit --backend kfp` "
        "sets it.",
    )
    fork_server: bool = Field(
        True,
        description="Local runs: one interpreter imports kfp, torch, MLflow and KServe beside "
        "the first steps, and kfp.local's step processes, the trainer (one worker) and the "
        "model server fork from it instead of importing them again (pipelines/warm.py); false "
        "starts each as a fresh process.",
    )
    image: str = Field(
        "mlops-pipeline:0.1.0",
        description="Container image of every step (pinned tag, never latest).",
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        name, _, tag = image.rpartition(":")
        if not name or "/" in tag or tag in ("", "latest") or any(c.isspace() for c in image):
            raise ValueError("needs a pinned tag, not latest (e.g. mlops-pipeline:0.1.0)")
        return image

    @field_validator("state_dir", mode="before")
    @classmethod
    def _not_empty(cls, path: Any) -> Any:
        # Path("") is the current folder: `--state-dir ''` spread the state over the checkout.
        if isinstance(path, str) and not path.strip():
            raise ValueError("is empty: pass a folder, e.g. --state-dir .mlops")
        return path

    @field_validator("state_dir")
    @classmethod
    def _home(cls, path: Path) -> Path:
        # A shell leaves `--state-dir=~/x` alone; unexpanded, it would make a folder named ~.
        try:
            return path.expanduser()
        except RuntimeError as exc:  # ~user of no such user, or no home directory at all
            raise ValueError(str(exc)) from None

    @property
    def model_name(self) -> str:
        """serving.model_name as set, else DATASET-ARCH: an MNIST run registered under the
        CIFAR-10 default met that champion at the gate, which refuses another task."""
        if self.serving.model_name:
            return self.serving.model_name
        # dataset.id may hold '.' and '_', which the name may not, and 63 characters: they
        # become '-', and the id is cut to fit. (It fell back to FORMAT-ARCH, so `my_pets` and
        # `pets.v2` shared one model, its versions and its champion.) An id that starts with a
        # digit follows its format's name: KServe's names start with a letter.
        arch = self.train.arch
        label = re.sub(r"[._]", "-", self.dataset.key)
        if not label[0].isalpha():
            label = f"{self.dataset.name}-{label}"
        name = f"{label[: 52 - len(arch)].strip('-')}-{arch}"
        return name if re.fullmatch(ISVC_NAME, name) else f"{self.dataset.name}-{arch}"

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, credentials masked (for logs and MLflow params)."""
        return self.model_dump(mode="json")


# --- Profiles: plain functions returning overrides of the defaults above ---------------------


def smoke() -> dict[str, Any]:
    """minutes on a laptop, proves the plumbing, not the model"""
    return {
        "dataset": {"synthetic_per_class": 60},
        # Small batches give the few images enough steps, at a lower lr chosen for them (train.lr
        # is the schedule's peak as given: nothing rescales it with the batch size).
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "stem": "s2"},
        "gate": {"min_accuracy": 0.2},
    }


def quick() -> dict[str, Any]:
    """the default: a good CIFAR-10 model in minutes on 2 CPU cores (the field defaults)"""
    return {}


def full() -> dict[str, Any]:
    """the best accuracy this recipe reaches, for a GPU or a long CPU run"""
    return {
        # The full-resolution stem: ~3.3x the s2 stem's cost per image, the best accuracy.
        "train": {"epochs": 12, "stem": "cifar"},
        "gate": {"min_accuracy": 0.85},
    }


PROFILES = {"smoke": smoke, "quick": quick, "full": full}
assert list(PROFILES) == list(get_args(ProfileName)), "ProfileName must list PROFILES"


# --- Loading ----------------------------------------------------------------------------------


class ConfigLoader(yaml.SafeLoader):
    """YAML, with YAML 1.2's numbers instead of PyYAML's 1.1 ones, where `epochs: 010` was 8
    (octal), `1:30` 90 (base 60) and `0x50` 80: a value reads as the decimal number it shows,
    as it does in a pod's `--set`, in kubectl and in Argo's form."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)
ConfigLoader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node)))


def _unique_keys(loader: ConfigLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping that names a key once: PyYAML keeps the last of two silently, so a file that
    set `epochs` twice trained with whichever came last, the first looking in force."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            break  # construct_mapping says so, in its own words
        if key in seen:
            raise yaml.constructor.ConstructorError(
                problem=f"{key!r} is set twice in one section: keep one",
                problem_mark=key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


ConfigLoader.add_constructor("tag:yaml.org,2002:map", _unique_keys)


def load_yaml(text: str) -> Any:
    """A config file's or a `--set` value's YAML (ConfigLoader: numbers as YAML 1.2 reads them)."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: plain data, no Python objects


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    # A section given whole (`--set 'train={epochs: 2}'`) is merged, as a --config file's is:
    # assigned, it dropped the profile's other values of the section without a word.
    both = isinstance(value, dict) and isinstance(node.get(leaf), dict)
    node[leaf] = _merge(node[leaf], value) if both else value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def read_yaml(path: Path, profile: str | None = None) -> dict[str, Any]:
    """Read a YAML config file; credentials in it are refused, and so is a profile other than
    `profile` (a dumped config names the one it came from; only --profile chooses it)."""
    try:
        path = path.expanduser()
    except RuntimeError as exc:  # ~user of no such user, or no home directory
        raise ConfigError(f"config file {path}: {exc}") from None
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: pass a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}): pass a YAML file"
        ) from None
    except yaml.YAMLError as exc:
        # PyYAML's own text is 8 lines with carets; the problem and where it is make one.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {why}") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(
            f"config file {path} nests too deeply: a config is a few levels of sections"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data)}")
    if profile is not None and data.get("profile", profile) != profile:
        raise ConfigError(
            f"config file {path} sets profile: {data['profile']}, but --profile is {profile}: "
            "choose the profile with --profile NAME, and remove it from the file"
        )
    # `run.py config` prints the keys as null: such a file reads back.
    leaked = {k for k, v in _flatten(data).items() if k in SECRET_FIELDS and v is not None}
    if leaked:
        raise ConfigError(
            f"config file {path} sets {', '.join(sorted(leaked))}: credentials come only from "
            "the environment (MINIO_ACCESS_KEY, MINIO_SECRET_KEY)"
        )
    return data


def format_validation_error(exc: ValidationError, env: dict[str, str] | None = None) -> str:
    """One line per bad field: its dotted name, the value given, and what is allowed. `env`:
    the keys whose value came from an environment variable, with the variable's name."""
    env = env or {}
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting (see `python pipelines/run.py config`)")
            continue
        msg = err["msg"].removeprefix("Value error, ")  # our validators' own words
        if err["type"] == "string_pattern_mismatch":  # not the regex, where words are known
            msg = PATTERN_WORDS.get(err.get("ctx", {}).get("pattern"), msg)
        if err["type"] == "value_error" and isinstance(err.get("input"), dict):
            # A section's own check, across its fields: its message names the field.
            lines.append(f"{field}.{msg}")
            continue
        value = "***" if field in SECRET_FIELDS else repr(err.get("input"))
        value = re.sub(r"//[^/@\s]*@", "//***@", value)  # a URL's user and password
        # YAML reads 2024, 0.5 or on as a number or a boolean, and such a field wants text.
        text = err["type"] == "string_type" and err.get("input") is not None
        quote = " (quote it in a YAML file)" if text else ""
        origin = f" (from {env[field]})" if field in env else ""
        lines.append(f"{field}={value}{origin}: {msg}{quote}")
    return "; ".join(lines)


def _set_all(tree: dict[str, Any], values: dict[str, Any]) -> None:
    """`--set` values into the tree: never a credential or the profile's label."""
    for dotted, value in values.items():
        if dotted in SECRET_FIELDS:
            raise ConfigError(f"{dotted} comes only from the environment, not from a flag")
        if dotted == "profile":
            # Setting the label alone would apply none of the profile's values.
            raise ConfigError(f"profile={value}: choose the profile with --profile NAME")
        _set_path(tree, dotted, value)


def load_config(
    profile: str = "quick",
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    stored: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Resolve a config: defaults < profile < a resumed run's stored settings < YAML file <
    environment < CLI overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"profile={profile!r}: choose one of {', '.join(PROFILES)}")
    tree = _merge({"profile": profile}, PROFILES[profile]())
    _set_all(tree, stored or {})
    if config_file is not None:
        tree = _merge(tree, read_yaml(config_file, profile))
    from_env = _set_env(tree, os.environ if environ is None else environ)
    _set_all(tree, overrides or {})
    return _validate(tree, {k: v for k, v in from_env.items() if k not in (overrides or {})})


def _set_env(tree: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """ENV_VARS' values into the tree; returns the keys set, each with its variable."""
    from_env = {}
    for var, dotted in ENV_VARS.items():
        if environ.get(var):
            _set_path(tree, dotted, environ[var])
            from_env[dotted] = var
    return from_env


def _validate(tree: dict[str, Any], from_env: dict[str, str]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, from_env)) from None


def storage_env(storage: StorageConfig) -> dict[str, str]:
    """The variables (ENV_VARS' storage part) that point a child process at this store."""
    assert storage.endpoint and storage.access_key and storage.secret_key
    return {
        "MINIO_ENDPOINT": storage.endpoint,
        "MINIO_ACCESS_KEY": storage.access_key.get_secret_value(),
        "MINIO_SECRET_KEY": storage.secret_key.get_secret_value(),
    }


def mlflow_env(mlflow: MlflowConfig) -> dict[str, str]:
    """What every process that imports mlflow gets: the telemetry switch (the library's own
    default is on, and tries to reach the internet from each step)."""
    return {"MLFLOW_DISABLE_TELEMETRY": "false" if mlflow.telemetry else "true"}


def public_json(cfg: PipelineConfig) -> str:
    """The resolved config as JSON for a step's parameter: credentials left out (they travel
    in the environment), so it can sit in a pipeline spec or a log."""
    return cfg.model_dump_json(exclude={"storage": {"access_key", "secret_key"}})


def config_overrides(cfg: PipelineConfig) -> dict[str, str]:
    """The keys where cfg differs from its profile, as `--set` values (JSON is valid YAML).

    Endpoints and the state dir are left out: a pod takes them from its own environment."""
    local = {"state_dir", "storage.endpoint", "mlflow.tracking_uri"}
    mine = _flatten(json.loads(public_json(cfg)))
    base = _flatten(json.loads(public_json(load_config(cfg.profile, environ={}))))
    return {k: json.dumps(v) for k, v in mine.items() if k not in local and base.get(k, ...) != v}


def for_cluster(cfg: PipelineConfig) -> PipelineConfig:
    """The config as the pods see it: in-cluster endpoints, the Kubernetes runtime."""
    tree = json.loads(public_json(cfg))
    _set_path(tree, "storage.endpoint", cfg.cluster.s3_endpoint)
    _set_path(tree, "mlflow.tracking_uri", cfg.cluster.mlflow_uri)
    _set_path(tree, "runtime", "kubernetes")
    return PipelineConfig.model_validate(tree)


def config_from_json(text: str, environ: dict[str, str] | None = None) -> PipelineConfig:
    """The inverse of public_json, with credentials (and any endpoint) from the environment."""
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config parameter is not JSON: {exc}") from None
    return _validate(tree, _set_env(tree, os.environ if environ is None else environ))


def describe_fields(node: BaseModel | None = None, prefix: str = "") -> list[str]:
    """Every config key with its default and description, for --help and `run.py config`."""
    node = PipelineConfig() if node is None else node
    lines = []
    for name, field in type(node).model_fields.items():
        if not prefix and name == "profile":
            continue  # --profile sets it, and its help lists the profiles
        value = getattr(node, name)
        if isinstance(value, BaseModel):
            lines.extend(describe_fields(value, f"{prefix}{name}."))
            continue
        lines.append(f"  {prefix}{name} (default {value!s}): {field.description}")
    return lines
