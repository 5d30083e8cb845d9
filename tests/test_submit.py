"""submit, list, status, logs, stop and template create, against a stand-in Argo Server; and
a KFP run, against a stand-in KFP API server.

FakeArgoServer and FakeKfpServer are mocks, and named as such: no Argo Server, KFP API server
or controller can run here. Each is a thin HTTP server on 127.0.0.1 that speaks the few REST
calls the client makes and records what it was sent; the client code under test is the real
one.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipelines.config import load_config
from pipelines.processes import free_port
from pipelines.submit import ArgoTarget
from tests.tls import self_signed

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token"


class LocalServer(ThreadingHTTPServer):
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", free_port()), handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class JsonHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _reply(self, code: int, body: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")


@contextmanager
def serving(server: LocalServer) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()


class FakeArgoServer(LocalServer):
    def __init__(self) -> None:
        super().__init__(Handler)
        self.workflows: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.queries: list[tuple[str, str, str]] = []  # the calls with their query strings


class Handler(JsonHandler):
    server: FakeArgoServer

    def _route(self, method: str) -> None:
        path = self.path.split("?")[0].strip("/").split("/")
        self.server.calls.append((method, "/".join(path)))
        self.server.queries.append((method, "/".join(path), urllib.parse.urlsplit(self.path).query))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"message": "token not valid"})
            return
        kind, _namespace, *rest = path[2:]
        store = self.server.workflows if kind == "workflows" else self.server.templates
        if method == "POST" and not rest:
            doc = self._body()["workflow" if kind == "workflows" else "template"]
            meta = doc["metadata"]
            meta["name"] = meta.get("name") or meta["generateName"] + f"{len(store):05d}"
            meta["resourceVersion"] = "1"
            doc["status"] = {
                "phase": "Running",
                "nodes": {
                    "n1": {
                        "displayName": "verify-data",
                        "type": "Pod",
                        "phase": "Succeeded",
                        "id": "n1",
                        "name": "n1",
                    },
                    "n2": {
                        "displayName": "train",
                        "type": "Pod",
                        "phase": "Running",
                        "id": "n2",
                        "name": "n2",
                    },
                },
            }
            store[meta["name"]] = doc
            self._reply(200, doc)
        elif method == "GET" and not rest:
            self._reply(200, {"metadata": {}, "items": list(store.values())})
        elif rest and rest[0] not in store:
            self._reply(404, {"message": f"{kind} {rest[0]} not found"})
        elif method == "GET" and rest[1:] == ["log"]:
            # As the Argo Server does: each workflow pod's log of the one container asked for.
            container = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)[
                "logOptions.container"
            ]
            pods = {
                "main": [("verify-data-1", "verify-data says hi"), ("train-1", "job created")],
                "pytorch": [("train-master-0", "epoch 1 of 8")],  # the PyTorchJob's pods
            }[container[0]]
            lines = [
                {"result": {"podName": f"{rest[0]}-{pod}", "content": content}}
                for pod, content in pods
            ]
            self._reply(200, None, "\n".join(json.dumps(x) for x in lines).encode())
        elif method == "GET":
            self._reply(200, store[rest[0]])
        elif method == "PUT" and rest[1:] == ["stop"]:
            store[rest[0]]["status"]["phase"] = "Failed"
            self._reply(200, store[rest[0]])
        elif method == "PUT":
            # As the API server does for a custom resource: an update names the version it
            # replaces.
            doc, stored = self._body()["template"], store[rest[0]]["metadata"]["resourceVersion"]
            if doc["metadata"].get("resourceVersion") != stored:
                why = "metadata.resourceVersion: Invalid value: 0x0: must be specified"
                self._reply(422, {"code": 422, "message": f"{why} for an update"})
                return
            doc["metadata"]["resourceVersion"] = str(int(stored) + 1)
            store[rest[0]] = doc
            self._reply(200, doc)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")


@pytest.fixture
def argo() -> Iterator[FakeArgoServer]:
    with serving(FakeArgoServer()) as server:
        yield server


class FakeKfpServer(LocalServer):
    """The KFP API (v2beta1) calls of Client.create_run_from_pipeline_package: the health
    check, the experiment lookup by name, and the run, which it records."""

    def __init__(self) -> None:
        super().__init__(KfpHandler)
        self.runs: list[dict[str, Any]] = []
        self.auth: list[str | None] = []  # each request's Authorization header


class KfpHandler(JsonHandler):
    server: FakeKfpServer

    def do_GET(self) -> None:
        self.server.auth.append(self.headers.get("Authorization"))
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._reply(200, {"multi_user": False})
        else:  # /apis/v2beta1/experiments?filter=...: KFP's default experiment exists
            self._reply(200, {"experiments": [{"experiment_id": "e1", "display_name": "Default"}]})

    def do_POST(self) -> None:
        self.server.auth.append(self.headers.get("Authorization"))
        run = self._body()
        self.server.runs.append(run)
        self._reply(200, {**run, "run_id": "r1"})


@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")
def test_kfp_runs_as_the_pipeline_account() -> None:
    """Without service_account, KFP runs the pods as its own broad pipeline-runner account."""
    from pipelines.submit import submit_kfp  # imports kfp: only here

    cfg = load_config(environ={})
    with serving(FakeKfpServer()) as kfp:
        run_id = submit_kfp(cfg, kfp.url, ROOT / "pipelines/compiled/kfp-pipeline.yaml", "run-1")
    (run,) = kfp.runs
    assert run_id == "r1" and run["service_account"] == cfg.cluster.service_account
    assert run["experiment_id"] == "e1"
    assert set(kfp.auth) == {None}
    # Behind a login (a multi-user install), every request carries the bearer token given.
    with serving(FakeKfpServer()) as kfp:
        ir = ROOT / "pipelines/compiled/kfp-pipeline.yaml"
        assert submit_kfp(cfg, kfp.url, ir, "run-2", token="t0k") == "r1"
    assert len(kfp.auth) >= 3 and set(kfp.auth) == {"Bearer t0k"}  # health, experiment, run


def cli(
    *args: str, url: str, token: str = TOKEN, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ARGO_SERVER": url, "ARGO_TOKEN": token, **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "pipelines/run.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_submit_sends_the_compiled_workflow_with_parameters(argo: FakeArgoServer) -> None:
    out = cli(
        "submit", "--dataset", "mnist", "--epochs", "007", "--set", "dataset.id=digits",
        url=argo.url,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (name,) = argo.workflows
    assert name in out.stdout
    spec = argo.workflows[name]["spec"]
    assert spec["entrypoint"] == "pipeline"
    params = {p["name"]: p.get("value") for p in spec["arguments"]["parameters"]}
    # The checked value: a pod reads the text it is sent, and read "007" was 7 (YAML 1.1: octal).
    assert params["dataset"] == "mnist" and params["epochs"] == "7"
    assert params["model-name"] == ""  # unset: each pod names it after the dataset
    assert params["precision"] == "auto"  # the others keep their defaults
    # A setting with no UI parameter travels in the pods' own arguments.
    templates = {t["name"]: t for t in spec["templates"]}
    args = templates["verify-data"]["container"]["args"]
    assert 'dataset.id="digits"' in args
    assert "dataset.name={{workflow.parameters.dataset}}" in args


def test_namespace_is_the_configs_for_the_request_and_the_workflow(argo: FakeArgoServer) -> None:
    """--namespace is cluster.namespace: the workflow compiled for another namespace than the
    one it is sent to would put its pods, jobs and services where the request did not say."""
    assert cli("submit", "--namespace", "team-a", url=argo.url).returncode == 0
    (workflow,) = argo.workflows.values()
    assert ("POST", "api/v1/workflows/team-a") in argo.calls
    assert workflow["metadata"]["namespace"] == "team-a"
    bad = cli("list", "--namespace", "Team_A", url=argo.url)
    assert bad.returncode == 2 and bad.stderr == (
        "error: cluster.namespace='Team_A': a DNS-1123 label is expected: 1-63 lowercase "
        "letters, digits and '-', starting and ending with a letter or digit\n"
    )
    assert len(argo.calls) == 1  # refused before any request


def test_list_status_logs_and_stop(argo: FakeArgoServer) -> None:
    assert cli("submit", url=argo.url).returncode == 0
    (name,) = argo.workflows
    listed = cli("list", url=argo.url)
    assert listed.returncode == 0 and name in listed.stdout and "Running" in listed.stdout
    status = cli("status", name, url=argo.url)
    assert status.returncode == 0
    assert "verify-data" in status.stdout and "Succeeded" in status.stdout
    logs = cli("logs", name, "--step", "train", url=argo.url)
    assert logs.returncode == 0
    assert "job created" in logs.stdout and "verify-data says hi" not in logs.stdout
    assert f"{name}-train-master-0: epoch 1 of 8" in logs.stdout  # the trainer's own log
    stopped = cli("stop", name, url=argo.url)
    assert stopped.returncode == 0 and argo.workflows[name]["status"]["phase"] == "Failed"
    assert cli("status", name, url=argo.url).returncode == 1  # a failed run reads as one


class CannedServer(LocalServer):
    """A MOCK of what may sit on the Argo Server's port instead: it answers every request
    200 with one body (a sign-in proxy's page, another web app, a log stream's error line)."""

    def __init__(self, body: bytes, status: int = 200, tls: tuple[Path, Path] | None = None):
        super().__init__(CannedHandler)
        self.body, self.status, self.tls = body, status, tls
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        return super().url.replace("http:", "https:") if self.tls else super().url


class CannedHandler(JsonHandler):
    server: CannedServer

    def _canned(self) -> None:
        self._reply(self.server.status, None, self.server.body)

    do_GET = do_POST = do_PUT = _canned


@pytest.mark.parametrize(
    ("body", "commands"),
    [
        (b"<!DOCTYPE html><html>sign in</html>", ["list", "status", "stop", "submit", "logs"]),
        (b"{}", ["list", "status", "template", "logs"]),
    ],
)
def test_a_server_that_is_not_argos_is_named_in_one_line(body: bytes, commands: list[str]) -> None:
    """A 200 that is not the API's answer was a traceback (JSON, or pydantic's validation)."""
    args = {"status": ["status", "wf-x"], "stop": ["stop", "wf-x"], "logs": ["logs", "wf-x"]}
    with serving(CannedServer(body)) as page:
        for command in commands:
            out = cli(
                *args.get(command, [command, "create"] if command == "template" else [command]),
                url=page.url,
            )
            assert out.returncode == 1, (command, out.stderr)
            assert "Traceback" not in out.stderr, (command, out.stderr)
            assert f"{page.url} did not answer" in out.stderr, (command, out.stderr)
            assert out.stderr.count("\n") == 1 and "check --argo-server" in out.stderr


def test_an_untrusted_certificate_is_named_and_k_accepts_it(tmp_path: Path) -> None:
    """An untrusted certificate read as "cannot reach ... port-forwarded"; and -k did nothing
    for submit --backend kfp."""
    listed = json.dumps({"metadata": {}, "items": []}).encode()
    with serving(CannedServer(listed, tls=self_signed(tmp_path))) as server:
        env = {"ARGO_INSECURE_SKIP_VERIFY": ""}
        out = cli("list", url=server.url, extra_env=env)
        assert out.returncode == 1 and "presented a certificate this machine does not trust" in (
            out.stderr
        )
        assert "pass -k" in out.stderr and "cannot reach" not in out.stderr
        assert cli("list", "-k", url=server.url, extra_env=env).returncode == 0
        kfp = ["submit", "--backend", "kfp", "--kfp-host", server.url]
        out = cli(*kfp, url=server.url, extra_env=env)
        assert out.returncode == 1 and "does not trust" in out.stderr
        out = cli(*kfp, "-k", url=server.url, extra_env=env)
        assert "does not trust" not in out.stderr and "Traceback" not in out.stderr


def test_a_kfp_server_that_asks_for_a_login_says_so_at_once() -> None:
    """kfp's client retried its health check 5 times (25 s), then said it could not reach it."""
    with serving(CannedServer(b'{"error": "unauthorized"}', status=401)) as server:
        out = cli("submit", "--backend", "kfp", "--kfp-host", server.url, url=server.url)
        assert out.returncode == 1 and "answered 401: it asks for a login" in out.stderr
        assert "--kfp-token / KFP_TOKEN" in out.stderr
        assert len(out.stderr.splitlines()) == 1, out.stderr
        # A token it refuses is named as such, not as a login it asks for.
        refused = cli(
            "submit", "--backend", "kfp", "--kfp-host", server.url, url=server.url,
            extra_env={"KFP_TOKEN": "stale"},
        )  # fmt: skip
    assert refused.returncode == 1 and "refused the token (401)" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    # Another answer than 200 (not the KFP API's URL; a failing server) is named at once too:
    # it was "cannot reach", after 28 s of kfp's retries.
    for status in (404, 500):
        with serving(CannedServer(b"404 page not found", status=status)) as server:
            out = cli("submit", "--backend", "kfp", "--kfp-host", server.url, url=server.url)
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
        assert f"answered {status} to its health check (404 page not found)" in out.stderr


def test_a_log_streams_error_fails_the_command() -> None:
    line = json.dumps({"error": {"message": "pod wf-x-train-1 not found"}}).encode()
    with serving(CannedServer(line)) as page:
        out = cli("logs", "wf-x", url=page.url)
    assert out.returncode == 1 and "pod wf-x-train-1 not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_logs_take_a_step_by_name_and_list_shows_the_pipelines_workflows(
    argo: FakeArgoServer,
) -> None:
    assert cli("submit", url=argo.url).returncode == 0
    (name,) = argo.workflows
    # Any part of the workflow's name matched every pod; a misspelt step printed nothing, 0.
    typo = cli("logs", name, "--step", "trian", url=argo.url)
    assert typo.returncode == 2 and "invalid choice: 'trian'" in typo.stderr
    part = cli("logs", name, "--step", "verify-data", url=argo.url)
    assert part.returncode == 0 and "verify-data says hi" in part.stdout
    assert "job created" not in part.stdout and "epoch 1" not in part.stdout
    assert cli("list", url=argo.url).returncode == 0
    (query,) = [q for m, p, q in argo.queries if m == "GET" and p == "api/v1/workflows/mlops"]
    selector = urllib.parse.parse_qs(query)["listOptions.labelSelector"]
    assert selector == ["app.kubernetes.io/part-of=mlops-pipeline"]
    spec = argo.workflows[name]
    assert spec["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mlops-pipeline"
    # Argo's Error phase (its own failure, a pod deleted) is a failed run too.
    spec["status"]["phase"] = "Error"
    assert cli("status", name, url=argo.url).returncode == 1


def test_a_job_its_pods_would_refuse_is_refused_before_any_request(argo: FakeArgoServer) -> None:
    """256 images over 3 ranks failed the trainer on the cluster, after the data steps; a
    source path of this machine failed verify-data there, as no pod has it."""
    for command in (["submit"], ["template", "create"]):
        out = cli(*command, "--workers", "3", url=argo.url)
        assert out.returncode == 2 and "must be a multiple of 3 ranks" in out.stderr
    out = cli("submit", "--set", f"dataset.source={ROOT}", url=argo.url)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is a path on this machine" in out.stderr and "components.verify_data" in out.stderr
    assert argo.calls == [] and argo.workflows == {} and argo.templates == {}


def test_template_create_then_update(argo: FakeArgoServer) -> None:
    first = cli("template", "create", url=argo.url)
    assert first.returncode == 0, first.stderr
    assert list(argo.templates) == ["image-classifier"]
    again = cli("template", "create", url=argo.url)  # an update, of the version it replaces
    assert again.returncode == 0, again.stderr
    assert ("PUT", "api/v1/workflow-templates/mlops/image-classifier") in argo.calls
    assert argo.templates["image-classifier"]["metadata"]["resourceVersion"] == "2"


def test_errors_name_the_server_and_leave_no_traceback(argo: FakeArgoServer) -> None:
    refused = cli("list", url=argo.url, token="wrong")
    assert refused.returncode == 1 and argo.url in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = cli("status", "no-such-run", url=argo.url)
    assert missing.returncode == 1 and "not found" in missing.stderr
    # `logs` gives the API's words too: it said "404 Client Error: Not Found for url ...".
    missing = cli("logs", "no-such-run", url=argo.url)
    assert missing.returncode == 1 and "404: workflows no-such-run not found" in missing.stderr
    down = f"http://127.0.0.1:{free_port()}"
    unreachable = cli("list", url=down)
    assert unreachable.returncode == 1
    assert f"cannot reach the Argo Server at {down}" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_a_server_that_answers_a_web_page_is_one_line(tmp_path: Path) -> None:
    """Another server on the port (here Python's, whose 404 is a page): the error printed the
    whole page, 14 lines of HTML."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = cli("list", url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.endswith(
        "refused list: Server returned status code 404 with message (an "
        "HTML page, not the API's answer)\n"
    )


@pytest.mark.parametrize("backend", ["argo", "kfp"])
def test_a_bad_or_unreachable_server_is_one_line(backend: str) -> None:
    """A URL that names no http(s) server is a usage error (exit 2) before any request; one
    that nobody answers is exit 1 naming it. kfp's client is urllib3's: its MaxRetryError
    was a traceback."""
    flag = "--argo-server" if backend == "argo" else "--kfp-host"
    submit = ["submit", "--backend", backend]
    for bad in ("ftp://host", "http://:2746", "localhost:port", "http://[::1"):
        out = cli(*submit, flag, bad, url="")
        assert out.returncode == 2, out.stderr
        assert out.stderr.endswith(
            "is not a server URL; expected http(s)://HOST[:PORT], e.g. "
            f"{'https://localhost:2746' if backend == 'argo' else 'http://localhost:8080'}\n"
        )
    down = f"http://127.0.0.1:{free_port()}"
    out = cli(*submit, flag, down, url="")
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: cannot reach the ") and out.stderr.count("\n") == 1
    assert down in out.stderr


def test_tls_verification_is_on_unless_asked_off(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(environ={})
    monkeypatch.delenv("ARGO_INSECURE_SKIP_VERIFY", raising=False)
    target = ArgoTarget.resolve("localhost:2746", "t", cfg)
    assert target.url == "https://localhost:2746" and target.verify_tls
    assert target.token == "Bearer t" and target.namespace == cfg.cluster.namespace
    assert not ArgoTarget.resolve("localhost:2746", None, cfg, insecure=True).verify_tls
    monkeypatch.setenv("ARGO_INSECURE_SKIP_VERIFY", "true")  # as the argo CLI reads it
    assert not ArgoTarget.resolve("localhost:2746", None, cfg).verify_tls
