"""The cluster job API: submit, list, status, logs and stop, through the Argo Server (and KFP)."""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3
from hera.exceptions import HeraException
from hera.workflows import WorkflowsService
from hera.workflows import models as m

from pipelines.config import PipelineConfig
from pipelines.errors import ConfigError, PipelineError, server_said
from pipelines.names import PART_OF, TRAINER_CONTAINER

TIMEOUT_S = 15


def server_url(url: str, where: str, example: str) -> str:
    """A server's URL as the argo and kfp CLIs read it (https:// unless a scheme is given),
    checked: a bad one is a usage error here, not a library's assertion or retry later."""
    if "://" not in url:
        url = f"https://{url}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is no number)
    except ValueError:  # that, or a bracket left open (http://[::1)
        parts = urllib.parse.SplitResult("", "", "", "", "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: {url} is not a server URL; expected http(s)://HOST[:PORT], e.g. {example}"
        )
    return url.rstrip("/")


def untrusted(server: str, url: str, exc: Exception) -> str:
    return (
        f"{server} at {url} presented a certificate this machine does not trust "
        f"({server_said(exc)}); for a port-forwarded server's self-signed certificate, pass -k"
    )


@dataclass(frozen=True)
class ArgoTarget:
    url: str
    token: str | None
    namespace: str
    verify_tls: bool = True

    @classmethod
    def resolve(
        cls,
        url: str | None,
        token: str | None,
        cfg: PipelineConfig,
        insecure: bool = False,
    ) -> ArgoTarget:
        url = url or os.environ.get("ARGO_SERVER")
        if not url:
            raise ConfigError("no Argo Server: pass --argo-server URL or set ARGO_SERVER")
        url = server_url(url, "--argo-server / ARGO_SERVER", "https://localhost:2746")
        token = token or os.environ.get("ARGO_TOKEN")
        if token and not token.startswith("Bearer "):
            token = f"Bearer {token}"
        # As the argo CLI: a port-forwarded server presents its self-signed certificate.
        insecure = insecure or os.environ.get("ARGO_INSECURE_SKIP_VERIFY", "") in ("true", "1")
        return cls(url, token, cfg.cluster.namespace, not insecure)


class ArgoClient:
    """Hera's WorkflowsService, with every failure turned into one line that names the URL."""

    def __init__(self, target: ArgoTarget):
        self.target = target
        if not target.verify_tls:  # asked for: one warning per request would bury the output
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.service = WorkflowsService(
            host=target.url,
            token=target.token,
            namespace=target.namespace,
            verify_ssl=target.verify_tls,
        )

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as exc:  # a ConnectionError: "cannot reach" misled
            raise PipelineError(untrusted("the Argo Server", self.target.url, exc)) from None
        except requests.exceptions.ConnectionError:
            raise PipelineError(
                f"cannot reach the Argo Server at {self.target.url} ({what}); check "
                "--argo-server / ARGO_SERVER and that the server is port-forwarded"
            ) from None
        except requests.exceptions.Timeout:
            raise PipelineError(
                f"the Argo Server at {self.target.url} timed out ({what})"
            ) from None
        except ValueError as exc:  # JSON that does not parse, or not as the API's (pydantic's)
            raise self._not_argo(what, exc) from None
        except (HeraException, requests.exceptions.RequestException) as exc:
            why = server_said(exc)
            raise PipelineError(
                f"the Argo Server at {self.target.url} refused {what}: {why}"
            ) from None

    def _not_argo(self, what: str, exc: Exception) -> PipelineError:
        """A 200 that is not the Argo API's answer: a sign-in proxy's page after a redirect,
        or another web app on the port. It was a traceback."""
        return PipelineError(
            f"{self.target.url} did not answer {what} as an Argo Server does "
            f"({server_said(exc)}); check --argo-server / ARGO_SERVER: the URL of the Argo "
            "Server itself, port-forwarded (kubectl -n argo port-forward svc/argo-server 2746)"
        )

    def submit(self, cfg: PipelineConfig, parameters: dict[str, str]) -> str:
        from pipelines.argo import build  # here: list, status, logs and stop need none of it

        workflow = build(cfg)
        workflow.arguments = [p for p in workflow.arguments if p.name not in parameters]  # type: ignore[union-attr]
        workflow.arguments += [m.Parameter(name=k, value=v) for k, v in parameters.items()]  # type: ignore[operator]
        body = m.WorkflowCreateRequest(workflow=workflow.build())
        created = self._call("submit", self.service.create_workflow, body, self.target.namespace)
        return created.metadata.name

    def create_template(self, cfg: PipelineConfig) -> str:
        from pipelines.argo import build_template

        template = build_template(cfg).build()
        name = template.metadata.name
        try:
            current = self.service.get_workflow_template(name, self.target.namespace)
        except (HeraException, requests.exceptions.HTTPError):
            current = None
        except requests.exceptions.ConnectionError:
            current = None  # reported by the create below, with the URL
        except ValueError as exc:
            raise self._not_argo("template get", exc) from None
        if current is not None:
            # The version it replaces: the API server refuses a custom resource's update
            # without one ("must be specified for an update"), so no update ever landed.
            template.metadata.resource_version = current.metadata.resource_version
            req = m.WorkflowTemplateUpdateRequest(template=template)
            self._call(
                "template update",
                self.service.update_workflow_template,
                name,
                req,
                self.target.namespace,
            )
        else:
            req = m.WorkflowTemplateCreateRequest(template=template)
            self._call(
                "template create", self.service.create_workflow_template, req, self.target.namespace
            )
        return name

    def list(self) -> list[dict[str, str]]:
        listed = self._call(
            "list",
            self.service.list_workflows,
            self.target.namespace,
            label_selector=",".join(f"{k}={v}" for k, v in PART_OF.items()),
        )
        rows = []
        for wf in listed.items or []:
            status = wf.status
            rows.append(
                {
                    "name": wf.metadata.name,
                    "phase": (status.phase if status else None) or "Pending",
                    "started": str(status.started_at) if status and status.started_at else "",
                }
            )
        return rows

    def status(self, run: str) -> dict[str, Any]:
        wf = self._call(f"status of {run}", self.service.get_workflow, run, self.target.namespace)
        status = wf.status
        nodes = (status.nodes or {}) if status else {}
        steps = {n.display_name: n.phase for n in nodes.values() if n.type == "Pod"}
        return {
            "name": run,
            "phase": status.phase if status else "Pending",
            "message": (status.message if status else None) or "",
            "steps": steps,
        }

    def logs(self, run: str, step: str | None = None) -> Iterator[str]:
        """Argo streams the log as lines of JSON; Hera's client reads a single entry only. The
        steps' pods log in their `main` container; the PyTorchJob's pods, which carry the
        workflow's label, in the trainer's, which the Argo Server reads only when asked."""
        url = f"{self.target.url}/api/v1/workflows/{self.target.namespace}/{run}/log"
        headers = {"Authorization": self.target.token} if self.target.token else {}

        def fetch(container: str) -> requests.Response:
            resp = requests.get(
                url,
                params={"logOptions.container": container},
                headers=headers,
                stream=True,
                timeout=TIMEOUT_S,
                verify=self.target.verify_tls,
            )
            if not resp.ok:  # the API's own words, as the other commands give them
                try:
                    message = resp.json().get("message") or resp.reason
                except (ValueError, AttributeError):
                    message = resp.reason
                raise requests.exceptions.HTTPError(f"{resp.status_code}: {message}", response=resp)
            return resp

        what = f"logs of {run}"
        for container in ("main", TRAINER_CONTAINER):
            resp = self._call(what, fetch, container)
            for line in resp.iter_lines(decode_unicode=True):
                if not line:
                    continue
                try:
                    doc = json.loads(line)
                    entry, error = doc.get("result"), doc.get("error")
                except (ValueError, AttributeError):
                    doc, entry, error = line, None, None
                if not isinstance(entry, dict) and not error:  # each line holds one or other
                    raise self._not_argo(what, ValueError(str(doc)))
                if error:  # the stream's own failure (a pod gone, a log not archived)
                    message = error.get("message", error) if isinstance(error, dict) else error
                    raise PipelineError(f"the Argo Server at {self.target.url} ({what}): {message}")
                pod = entry.get("podName", "")
                # A step's pods are named <workflow>-<step>-..., the PyTorchJob's too; a
                # substring matched every pod for any part of the workflow's name.
                if step and not pod.startswith(f"{run}-{step}-"):
                    continue
                yield f"{pod}: {entry.get('content', '')}"

    def stop(self, run: str) -> str:
        wf = self._call(
            f"stop {run}",
            self.service.stop_workflow,
            run,
            m.WorkflowStopRequest(name=run, namespace=self.target.namespace),
            self.target.namespace,
        )
        return (wf.status.phase if wf.status else None) or "Stopping"


def check_kfp(host: str, verify: bool, token: str | None = None) -> None:
    """One health check, whose answer is named: kfp's client retries it 5 times, for 25 s,
    and reports a server that refused the request (401, a sign-in in front of it) as one it
    could not reach."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = requests.get(
            f"{host}/apis/v2beta1/healthz", headers=headers, timeout=TIMEOUT_S, verify=verify
        )
    except requests.exceptions.SSLError as exc:
        raise PipelineError(untrusted("the KFP API server", host, exc)) from None
    except requests.exceptions.RequestException as exc:
        raise PipelineError(
            f"cannot reach the KFP API server at {host} ({server_said(exc)}); check --kfp-host "
            "/ KFP_HOST and that the server is port-forwarded"
        ) from None
    if resp.status_code in (401, 403) and token:
        raise PipelineError(
            f"the KFP API server at {host} refused the token ({resp.status_code}): check "
            "--kfp-token / KFP_TOKEN, and that its account may create runs"
        )
    if resp.status_code in (401, 403):
        raise PipelineError(
            f"the KFP API server at {host} answered {resp.status_code}: it asks for a login; "
            "pass a bearer token with --kfp-token / KFP_TOKEN (e.g. kubectl create token), "
            "or port-forward the API server itself, which asks for none (kubectl -n kubeflow "
            "port-forward svc/ml-pipeline 8888:8888, then --kfp-host http://localhost:8888)"
        )
    if resp.status_code != 200:
        # kfp's client retried it 5 times (28 s), then said it could not reach the server.
        raise PipelineError(
            f"the KFP API server at {host} answered {resp.status_code} to its health check "
            f"({server_said(Exception(resp.text))}): check --kfp-host / KFP_HOST, the URL of "
            "the KFP API (its ml-pipeline Service, or the Kubeflow gateway)"
        )


def submit_kfp(
    cfg: PipelineConfig,
    host: str | None,
    ir: Path,
    run_id: str,
    insecure: bool = False,
    token: str | None = None,
) -> str:
    """Upload the compiled IR as a run to a KFP API server (with a bearer token, if given)."""
    import kfp
    from kfp_server_api.exceptions import ApiException

    from pipelines.config import for_cluster, public_json

    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise ConfigError("no KFP API server: pass --kfp-host URL or set KFP_HOST")
    host = server_url(host, "--kfp-host / KFP_HOST", "http://localhost:8080")
    # urllib3 logs each retry of an unreachable server; the error below says it once. kfp warns
    # on every client that it needs KFP 2: the IR is KFP 2's.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "This client only works", FutureWarning)
    # kfp logs a traceback of each of its 5 health checks of a server that is not KFP's, on the
    # root logger, before its own error: 226 lines for the one below.
    logging.disable(logging.ERROR)
    if insecure:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    token = token or os.environ.get("KFP_TOKEN") or None
    check_kfp(host, not insecure, token)
    try:
        client = kfp.Client(host=host, existing_token=token, verify_ssl=False if insecure else None)
        run = client.create_run_from_pipeline_package(
            str(ir),
            # In-cluster endpoints, and training as a PyTorchJob through TrainingClient.
            arguments={
                "config": public_json(for_cluster(cfg)),
                "run_dir": "/tmp/run",
                "run_id": run_id,
            },
            namespace=cfg.cluster.namespace,
            # Without it the run's pods take KFP's broad default account (pipeline-runner).
            service_account=cfg.cluster.service_account,
        )
    except (requests.exceptions.ConnectionError, urllib3.exceptions.HTTPError, OSError) as exc:
        # kfp's generated client is urllib3's: a server it cannot reach is a MaxRetryError.
        why = getattr(exc, "reason", None) or exc
        raise PipelineError(
            f"cannot reach the KFP API server at {host} ({why}); check --kfp-host / KFP_HOST "
            "and that the server is port-forwarded"
        ) from None
    except ApiException as exc:
        why = server_said(exc)
        raise PipelineError(f"the KFP API server at {host} refused the run: {why}") from None
    finally:
        logging.disable(logging.NOTSET)
    return run.run_id
