"""knative/monitoring/ against what the functions really export: the Grafana dashboard's PromQL
refers only to series read from a real /metrics scrape of a token and a predict function (plus
the few names shared/metrics.py defines that a scrape may not show yet), and uses each metric as
its type allows; the PodMonitors and the Services' prometheus.io annotations reach every function
pod on the port its /metrics is served on; the config-observability patch and the NetworkPolicy
example validate; and none of it is applied by ``kubectl apply -k knative/``."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import requests
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from local import ROOT
from local.helpers import RedisServer, demo_image, encode
from shared import metrics
from shared.auth import AuthStore
from shared.config import Settings
from tests.test_knative import knative_services, one, rendered

MONITORING = ROOT / "knative" / "monitoring"
DASHBOARD = MONITORING / "thalamus-dashboard.json"
# What the issue asks the dashboard to show: requests, errors, latency by model, cold starts,
# token failures, Redis, the model served.
REQUIRED = {
    "thalamus_requests_total",
    "thalamus_request_duration_seconds_bucket",
    "thalamus_inference_duration_seconds_bucket",
    "thalamus_process_starts_total",
    "thalamus_tokens_total",
    "thalamus_auth_failures_total",
    "thalamus_redis_command_duration_seconds_bucket",
    "thalamus_redis_errors_total",
    "thalamus_model_info",
}
# Grafana's own variables, with a sample value so that an expression parses as PromQL.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# What rate() and friends may be applied to: counters and a histogram's series.
COUNTER_SUFFIXES = ("_total", "_bucket", "_sum", "_count")
RANGE_FUNCTIONS = {"rate", "irate", "increase"}
# Knative's port names in every revision pod: the user container's port, whatever the Service
# calls it, and the queue-proxy's request-metrics port (v1.UserPortName, v1.UserQueueMetricsPortName).
USER_PORT, QUEUE_PROXY_METRICS_PORT = "user-port", "http-usermetric"
SERVING_OVERLAYS = ("knative", "knative/routing")


# -- what the functions export ------------------------------------------------------------------


@pytest.fixture
def settings(own_redis: RedisServer) -> Settings:
    """conftest's settings, on a Redis of this test's own (the functions started here use it
    too, through conftest's env), so that the test may stop it."""
    return Settings(redis_url=own_redis.url, redis_url_is_default=False, prefix="test-monitoring:")


def sample_names(text: str) -> set[str]:
    """The series names of a /metrics answer as PromQL sees them (a counter's with ``_total``,
    a histogram's as ``_bucket``, ``_sum`` and ``_count``)."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def defined_names(collector: Any) -> set[str]:
    """The series names a shared/metrics.py collector exports once it has a sample."""
    (family,) = collector.describe()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[family.type]
    return {family.name + suffix for suffix in suffixes}


@pytest.fixture
def scraped(serve_function, settings: Settings, own_redis: RedisServer) -> set[str]:
    """The series names a token and a predict function export after a token, a prediction,
    refused credentials and a Redis outage: their /metrics over real HTTP."""
    token_base = serve_function("token")
    predict_base = serve_function("predict", MODEL_NAME="shapes")
    pair = AuthStore(settings).create_key()
    credentials = {"public_key": pair.public_key, "secret_key": pair.secret_key}
    issued = requests.post(f"{token_base}/token.json", json=credentials, timeout=10)
    assert issued.status_code == 200, issued.text
    bearer = {"Authorization": f"Bearer {issued.json()['token']}"}
    wrong = {**credentials, "secret_key": "sk_" + "A" * 43}
    assert requests.post(f"{token_base}/token.json", json=wrong, timeout=10).status_code == 401
    image = {"file": ("a.png", encode(demo_image("shapes", "circle", 7)))}
    predicted = requests.post(f"{predict_base}/models/shapes/predict.json", files=image, headers=bearer, timeout=30)
    assert predicted.status_code == 200, predicted.text
    refused = requests.get(f"{predict_base}/models/shapes.json", headers={"Authorization": "Bearer x"}, timeout=10)
    assert refused.status_code == 401
    own_redis.stop()
    assert requests.post(f"{token_base}/token.json", json=credentials, timeout=10).status_code == 503
    names: set[str] = set()
    for base in (token_base, predict_base):
        scrape = requests.get(f"{base}/metrics", timeout=10)
        assert scrape.status_code == 200
        names |= sample_names(scrape.text)
    return names


# -- the dashboard's PromQL -----------------------------------------------------------------------


def expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets (rows' panels included)
    and its query variables (``label_values(EXPR, label)`` gives EXPR)."""
    found = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels += panel.get("panels", [])
        found += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            values = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            found.append(values.group(1) if values else query)
    return found


def as_promql(expr: str, dashboard: dict) -> str:
    """``expr`` with each Grafana variable replaced by a sample value; an undefined one fails."""
    defined = {v["name"] for v in dashboard["templating"]["list"]}

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES or name in defined, f"undefined variable ${name} in {expr}"
        return GRAFANA_VARIABLES.get(name, "thalamus")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def query_errors(expr: str) -> tuple[set[str], list[str]]:
    """The series names ``expr`` reads, and its misuses: a selector without a metric name, a
    rate over a gauge, a histogram_quantile over anything but buckets summed by ``le``."""
    tree = promql_parser.parse(expr)
    names: set[str] = set()
    errors: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                errors.append(f"a selector without a metric name: {node}")
            names.add(node.name or "")
        if isinstance(node, promql_parser.Call) and node.func.name in RANGE_FUNCTIONS:
            selector = node.args[0].vector_selector.name
            if not selector.endswith(COUNTER_SUFFIXES):
                errors.append(f"{node.func.name}() over {selector}, not a counter or histogram series")
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            buckets: set[str] = set()
            promql_parser.walk(
                node.args[1],
                lambda n: buckets.add(n.name) if isinstance(n, promql_parser.VectorSelector) else None,
            )
            summed, labels = node.args[1], set()
            if isinstance(summed, promql_parser.AggregateExpr) and summed.modifier is not None:
                by = summed.modifier.type == promql_parser.AggModifierType.By
                labels = set(summed.modifier.labels) if by else set()
            if "le" not in labels or not any(name.endswith("_bucket") for name in buckets):
                errors.append(f"histogram_quantile needs sum by (le, …) over _bucket series: {node}")

    promql_parser.walk(tree, visit)
    return names, errors


def dashboard_queries(dashboard: dict) -> tuple[set[str], list[str]]:
    """The series names the whole dashboard reads, and every misuse in its expressions."""
    names: set[str] = set()
    errors: list[str] = []
    for expr in expressions(dashboard):
        found, wrong = query_errors(as_promql(expr, dashboard))
        names |= found
        errors += wrong
    return names, errors


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_reads_only_what_the_functions_export(scraped):
    used, errors = dashboard_queries(load_dashboard())
    assert errors == []
    assert used - scraped == set()
    assert used >= REQUIRED
    # The requests sent exercised every metric the module defines, so the scrape is the whole list.
    collectors = [c for c in vars(metrics).values() if isinstance(c, Counter | Gauge | Histogram)]
    everything = set().union(*(defined_names(c) for c in collectors))
    assert everything <= scraped
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "thalamus_worker_processes"} <= scraped


def test_the_dashboard_checks_catch_mistakes():
    dashboard = load_dashboard()
    broken = copy.deepcopy(dashboard)
    target = broken["panels"][1]["targets"][0]
    target["expr"] = target["expr"].replace("thalamus_requests_total", "thalamus_request_total")
    assert "thalamus_request_total" in dashboard_queries(broken)[0]
    for wrong in (
        "histogram_quantile(0.5, sum by (model) (rate(thalamus_inference_duration_seconds_bucket[5m])))",
        "histogram_quantile(0.5, sum without (le) (rate(thalamus_inference_duration_seconds_bucket[5m])))",
        "histogram_quantile(0.5, sum by (le) (rate(thalamus_inference_duration_seconds_sum[5m])))",
        "rate(thalamus_model_info[5m])",
        '{__name__="thalamus_requests_total"}',
    ):
        assert query_errors(wrong)[1], wrong
    with pytest.raises(AssertionError, match="undefined variable"):
        as_promql("rate(thalamus_requests_total{pod=~'$pod'}[5m])", dashboard)
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (function) (rate(thalamus_requests_total[5m])")


def test_the_dashboard_is_a_grafana_dashboard_on_a_chosen_prometheus():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"] and panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${" + source["name"] + "}"}
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in dashboard["panels"]
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]  # fmt: skip
    assert len(cells) == len(set(cells)), "panels overlap"


# -- scraping on the cluster ----------------------------------------------------------------------


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    tests = {
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: key not in labels or labels[key] not in values,
    }
    return all(tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", []))


def function_pods() -> list[tuple[str, dict[str, str], dict[str, str], dict]]:
    """(name, pod labels, pod annotations, container) of every function's pod template."""
    pods = []
    for overlay in SERVING_OVERLAYS:
        for service in knative_services(rendered(overlay)):
            template = service["spec"]["template"]
            meta = template["metadata"]
            pods.append(
                (service["metadata"]["name"], meta["labels"], meta["annotations"], template["spec"]["containers"][0])
            )
    return pods


def test_the_annotations_point_prometheus_at_each_functions_metrics():
    for name, _, pod_annotations, container in function_pods():
        assert pod_annotations["prometheus.io/scrape"] == "true", name
        assert pod_annotations["prometheus.io/path"] == "/metrics", name
        # Knative sets PORT to the container port, and shared/server.py listens on $PORT.
        assert pod_annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"]), name


def test_the_podmonitors_select_every_function_pod_and_nothing_else():
    monitors = rendered("knative/monitoring")
    assert {(d["apiVersion"], d["kind"]) for d in monitors} == {("monitoring.coreos.com/v1", "PodMonitor")}
    functions, queue_proxy = (
        one(monitors, "PodMonitor", "thalamus-functions"),
        one(monitors, "PodMonitor", "thalamus-queue-proxy"),
    )
    for monitor, port in ((functions, USER_PORT), (queue_proxy, QUEUE_PROXY_METRICS_PORT)):
        assert monitor["metadata"]["namespace"] == "thalamus"  # a PodMonitor selects pods of its own namespace
        spec = monitor["spec"]
        # The fields of monitoring.coreos.com/v1 PodMonitor used here, spelled as its CRD does.
        assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "podTargetLabels", "jobLabel"}
        (endpoint,) = spec["podMetricsEndpoints"]
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "honorLabels"}
        assert (endpoint["port"], endpoint["path"]) == (port, "/metrics")
        assert re.fullmatch(r"\d+[sm]", endpoint["interval"])
        for name, labels, _, _ in function_pods():
            assert selects(spec["selector"], labels), f"{monitor['metadata']['name']} misses {name}"
        redis_pod = one(rendered("knative/data"), "StatefulSet")["spec"]["template"]["metadata"]["labels"]
        assert not selects(spec["selector"], redis_pod)
    assert not selects({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"})


def test_monitoring_is_not_applied_with_the_functions():
    for overlay in (*SERVING_OVERLAYS, "knative/data"):
        kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
        assert not kinds & {("PodMonitor", "thalamus-functions"), ("ConfigMap", "config-observability")}
        assert not any(d["metadata"]["name"] == "thalamus-allow-prometheus" for d in rendered(overlay))
    listed = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())["resources"]
    assert listed == ["podmonitors.yaml"]  # the ConfigMap patch and the NetworkPolicy are applied by hand


def core_objects() -> list[dict]:
    return [
        yaml.safe_load((MONITORING / name).read_text())
        for name in ("config-observability.yaml", "networkpolicy.example.yaml")
    ]


def test_the_configmap_and_networkpolicy_validate_strictly(tmp_path):
    files = []
    for i, doc in enumerate(core_objects()):
        files.append(tmp_path / f"{i}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(validator), "--strict", *map(str, files)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_networkpolicy_example_opens_only_the_two_metrics_ports():
    policy = core_objects()[1]["spec"]
    for name, labels, _, _ in function_pods():
        assert selects(policy["podSelector"], labels), name
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [USER_PORT, QUEUE_PROXY_METRICS_PORT]
    (source,) = rule["from"]
    assert set(source) == {"namespaceSelector", "podSelector"}  # Prometheus' pods in its namespace, not anyone


# Sample values of the data Knative hands the request-log template (Request, Response, Revision).
TEMPLATE_SAMPLES = {
    ".Request.Method": "POST",
    ".Request.URL.EscapedPath": '/models/sh"apes/predict.json',
    '(.Request.Header.Get "X-Request-Id")': "4bf92f3577b34da6a3ce929d0e0e4736",
    ".Request.ContentLength": -1,
    ".Response.Code": 200,
    ".Response.Size": 163,
    ".Response.Latency": 1.25e-05,
    ".Revision.Service": "thalamus-shapes",
    ".Revision.Name": "thalamus-shapes-00001",
    ".Revision.PodName": "thalamus-shapes-00001-deployment-5d9c6-x2x7q",
}


def render_request_log(template: str) -> str:
    """What the queue-proxy writes for one request, for the template's actions this test knows:
    a field (inside quotes: as text; outside: a number) or ``printf "%q" FIELD`` (Go's quoting,
    which is JSON's for printable text)."""

    def action(match: re.Match) -> str:
        text = match.group(1).strip()
        quoted = re.fullmatch(r'printf "%q" (.+)', text)
        value = TEMPLATE_SAMPLES[quoted.group(1) if quoted else text]
        return json.dumps(value) if quoted else str(value)

    return re.sub(r"\{\{(.*?)\}\}", action, template)


def test_the_config_observability_patch_turns_on_queue_proxy_metrics_and_json_request_logs():
    configmap = core_objects()[0]
    assert (configmap["metadata"]["name"], configmap["metadata"]["namespace"]) == (
        "config-observability",
        "knative-serving",
    )
    data = configmap["data"]
    assert data["request-metrics-protocol"] == "prometheus"  # Knative ≥ 1.19
    assert data["metrics.request-metrics-backend-destination"] == "prometheus"  # Knative 1.13 – 1.18
    assert data["logging.enable-request-log"] == "true"
    template = data["logging.request-log-template"]
    assert "\n" not in template  # one line per request
    line = json.loads(render_request_log(template))
    assert line["status"] == 200 and line["path"] == '/models/sh"apes/predict.json'
    assert line["request_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and line["latency_s"] == 1.25e-05
    # Never a credential: no Authorization header, no query string, no body.
    assert not re.search(r"Authorization|RequestURI|RawQuery|\.Body|\.URL\.String", template)
