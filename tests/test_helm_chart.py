"""The Helm chart, rendered by the real `helm` binary (installed by scripts/install_helm.sh) with several value
sets, linted, validated with kubernetes-validate against two Kubernetes versions, and checked field by field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "expertmesh"
HELM = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")
pytestmark = pytest.mark.skipif(not Path(HELM).exists(), reason="helm is not installed (scripts/install_helm.sh)")

VALUE_SETS = {
    "default": [],
    "external-redis": ["--set", "redis.external.url=redis://redis.example:6379/0"],
    "hostpath-gpu": [
        "--set",
        "model.volume.type=hostPath",
        "--set",
        "pools.gpu=1",
        "--set",
        "gateway.gpu=1",
        "--set",
        "gateway.autoscaling.enabled=false",
        "--set",
        "autoscaler.enabled=false",
    ],
    "tracing": [
        "--set",
        "tracing.otlpEndpoint=http://otel:4317",
        "--set",
        "pools.count=8",
        "--set",
        "gateway.mtp=true",
        "--set",
        "gateway.numSpeculativeTokens=2",
        "--set",
        "gateway.prefixCaching=false",
    ],
    "mutual-tls": ["--set", "tls.secretName=expertmesh-tls"],
    "queue-keda-monitors": [
        "--set",
        "gateway.autoscaling.waitingRequests.enabled=true",
        "--set",
        "gateway.service.headless=true",
        "--set",
        "gateway.service.sessionAffinity=ClientIP",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "pools.count=4",
        "--set",
        "pools.replicasPerExpert=2",
    ],
    "queue-hpa": [
        "--set",
        "gateway.autoscaling.waitingRequests.enabled=true",
        "--set",
        "gateway.autoscaling.waitingRequests.provider=hpa",
        "--set",
        "pools.count=3",
        "--set",
        "pools.replicasPerExpert=3",
        "--set",
        "autoscaler.replicas=2",
    ],
}
# what a process is told to listen on, by flag: every port a probe or a Service reaches must be one of these
LISTEN_FLAGS = ("--grpc-port", "--port", "--http-port", "--metrics-port")


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HELM, "template", "demo", str(CHART), "--namespace", "serving", *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request, tmp_path_factory):
    result = render(*VALUE_SETS[request.param])
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("render") / f"{request.param}.yaml"
    path.write_text(result.stdout)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return request.param, path, docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, suffix):
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, (kind, suffix, [d["metadata"]["name"] for d in docs])
    return matches[0]


def test_helm_lint_clean():
    result = subprocess.run([HELM, "lint", str(CHART), "--strict"], capture_output=True, text=True)
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_manifests_validate(rendered, version):
    _, path, _ = rendered
    result = subprocess.run([VALIDATE, "--strict", "--quiet", "-k", version, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_labels_and_selectors(rendered):
    _, _, docs = rendered
    for d in docs:
        labels = d["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ):
            assert key in labels, (d["kind"], d["metadata"]["name"], key)
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
    for w in workloads:
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= w["spec"]["template"]["metadata"]["labels"].items(), w["metadata"]["name"]
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    for svc in by_kind(docs, "Service"):
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pod_labels)
    for sts in by_kind(docs, "StatefulSet"):
        assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind(docs, "Service")}


def test_grpc_probes_and_security(rendered):
    name, _, docs = rendered
    gateway = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    pools = one(docs, "StatefulSet", "-pools")["spec"]["template"]["spec"]
    for spec, service in ((gateway, "expertmesh.v1.GatewayService"), (pools, "expertmesh.v1.ExpertPoolService")):
        c = spec["containers"][0]
        if name == "mutual-tls":  # exec probes over the pod's certificate: test_mutual_tls_mounts_...
            assert c["readinessProbe"]["exec"]["command"][-2:] == [
                f"127.0.0.1:{c['ports'][0]['containerPort']}",
                service,
            ]
            continue
        assert c["readinessProbe"]["grpc"]["service"] == service
        assert c["readinessProbe"]["grpc"]["port"] == c["ports"][0]["containerPort"]
        assert "grpc" in c["livenessProbe"] and "grpc" in c["startupProbe"]
    for w in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "resources" in c


def test_pools_headless_and_identity(rendered):
    _, _, docs = rendered
    sts = one(docs, "StatefulSet", "-pools")
    headless = one(docs, "Service", "-pools")
    assert headless["spec"]["clusterIP"] == "None"
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--pool-id=$(POD_NAME)" in args  # stable identities become pool ids
    assert "--dense-experts" not in args  # the pools keep FP8 only unless pools.denseExperts


def test_pools_keep_dense_copies_when_asked():
    result = render("--set", "pools.denseExperts=true")
    assert result.returncode == 0, result.stderr
    sts = one(list(yaml.safe_load_all(result.stdout)), "StatefulSet", "-pools")
    assert "--dense-experts" in sts["spec"]["template"]["spec"]["containers"][0]["args"]


def test_autoscaler_rbac_is_scoped(rendered):
    name, _, docs = rendered
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    if name == "hostpath-gpu":
        assert not by_kind(docs, "Role")
        return
    role = one(docs, "Role", "-autoscaler")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    scale = rules[(("apps",), ("statefulsets/scale",))]
    assert scale["resourceNames"] == ["demo-expertmesh-pools"] and set(scale["verbs"]) <= {"get", "patch", "update"}
    assert set(rules[(("",), ("pods",))]["verbs"]) == {"get", "list", "watch"}
    lease = [r for r in role["rules"] if r["resources"] == ["leases"] and "resourceNames" in r][0]
    assert lease["resourceNames"] == ["demo-expertmesh-autoscaler"]
    for r in role["rules"]:
        assert "*" not in r["verbs"] and "delete" not in r["verbs"] and "secrets" not in r["resources"]
    args = one(docs, "Deployment", "-autoscaler")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--lease=demo-expertmesh-autoscaler" in args and "--statefulset=demo-expertmesh-pools" in args
    binding = one(docs, "RoleBinding", "-autoscaler")
    deploy = one(docs, "Deployment", "-autoscaler")
    assert binding["subjects"][0]["name"] == deploy["spec"]["template"]["spec"]["serviceAccountName"]


def test_value_specific_fields(rendered):
    name, _, docs = rendered
    gateway = one(docs, "Deployment", "-gateway")
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    if name == "external-redis":
        assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]
        assert env["EXPERTMESH_REDIS_URL"] == "redis://redis.example:6379/0"
    else:
        assert one(docs, "StatefulSet", "-redis")
        assert env["EXPERTMESH_REDIS_URL"] == "redis://demo-expertmesh-redis:6379/0"
    if name == "hostpath-gpu":
        vol = gateway["spec"]["template"]["spec"]["volumes"][0]
        assert vol["hostPath"]["path"] == "/var/lib/expertmesh/models"
        pools = one(docs, "StatefulSet", "-pools")["spec"]["template"]["spec"]["containers"][0]
        assert pools["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert not by_kind(docs, "HorizontalPodAutoscaler") and gateway["spec"]["replicas"] == 1
    else:
        scaler = one(docs, "ScaledObject" if name == "queue-keda-monitors" else "HorizontalPodAutoscaler", "-gateway")
        assert scaler["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
        assert gateway["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    if name == "tracing":  # with MTP on, 2 drafts a step; prefix caching off
        assert "--mtp" in args and "--num-speculative-tokens=2" in args and "--no-mtp" not in args
        assert "--no-prefix-caching" in args and "--prefix-caching" not in args
    else:
        assert "--no-mtp" in args and "--num-speculative-tokens=1" in args
        assert "--prefix-caching" in args and "--no-prefix-caching" not in args
    if name == "tracing":
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"
        assert one(docs, "StatefulSet", "-pools")["spec"]["replicas"] == 8
        assert (
            "--bootstrap-pools=8"
            in one(docs, "Deployment", "-autoscaler")["spec"]["template"]["spec"]["containers"][0]["args"]
        )


@pytest.mark.parametrize(
    "setting,message",
    [
        ("gateway.dispatchDtype=fp16", "dispatchDtype"),
        ("pools.count=0", "count"),
        ("model.volume.type=nfs", "type"),
        ("autoscaler.rebalanceThreshold=1.5", "rebalanceThreshold"),
        ("redis.external.url=http://nope", "url"),
        ("gateway.unknownKey=1", "unknownKey"),
        ("gateway.pdb.minAvailable=1", "minAvailable"),  # blocked every drain with one replica
        ("gateway.pdb.maxUnavailable=0", "maxUnavailable"),
        ("gateway.autoscaling.waitingRequests.provider=nope", "provider"),
        ("metrics.serviceMonitor.interval=often", "interval"),
        ("gateway.numSpeculativeTokens=0", "numSpeculativeTokens"),
    ],
)
def test_schema_rejects_bad_values(setting, message):
    result = render("--set", setting)
    assert result.returncode != 0
    assert message in result.stderr


def test_notes_render():
    result = subprocess.run(
        [HELM, "install", "demo", str(CHART), "--dry-run=client", "--namespace", "serving"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "expertmesh generate --target 127.0.0.1:50051" in result.stdout


def _containers(docs):
    for w in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            yield w, c


def _bound(container, port) -> int:
    """The container port a probe or Service port reaches, asserting the process listens on it on the pod IP."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    number = ports[port] if isinstance(port, str) else port
    assert number in ports.values(), (container["name"], port, ports)
    args = container.get("args", [])
    if container.get("command", [""])[0] == "python":  # ours: a flag names the port, --host makes it the pod's
        assert "--host=0.0.0.0" in args, f"{container['name']} listens on 127.0.0.1: {args}"
        assert any(a == f"{flag}={number}" for flag in LISTEN_FLAGS for a in args), (container["name"], number, args)
    else:  # redis: binds every address unless told otherwise
        assert not any("bind" in a for a in args), args
    return number


def test_probes_and_services_reach_what_each_process_binds(rendered):
    _, _, docs = rendered
    for _, c in _containers(docs):
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe is None or "exec" in probe:
                continue
            (action,) = [probe[k] for k in ("grpc", "httpGet", "tcpSocket") if k in probe]
            _bound(c, action["port"])
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
    for svc in by_kind(docs, "Service"):
        selector = svc["spec"]["selector"].items()
        (w,) = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        for port in svc["spec"]["ports"]:
            _bound(w["spec"]["template"]["spec"]["containers"][0], port["targetPort"])


def test_disruption_budgets_never_block_the_gateway_nor_lose_experts(rendered):
    name, _, docs = rendered
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    overrides = dict(a.split("=", 1) for a in VALUE_SETS[name][1::2])
    copies = int(overrides.get("pools.replicasPerExpert", values["pools"]["replicasPerExpert"]))
    gateway = one(docs, "PodDisruptionBudget", "-gateway")["spec"]
    assert "minAvailable" not in gateway and gateway["maxUnavailable"] == 1  # a drain never waits on the gateway
    pools = one(docs, "PodDisruptionBudget", "-pools")["spec"]
    assert pools["maxUnavailable"] == copies - 1  # every expert keeps a copy through any allowed eviction
    for pdb in (gateway, pools):
        assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize(
    "settings,message",
    [
        (["pools.pdb.maxUnavailable=1"], "must stay below pools.replicasPerExpert (1)"),
        (["pools.count=4", "pools.replicasPerExpert=2", "pools.pdb.maxUnavailable=2"], "must stay below"),
        (["pools.replicasPerExpert=3"], "needs at least as many pools"),
        (["gateway.autoscaling.minReplicas=5"], "minReplicas (5) is above maxReplicas (4)"),
        (["gateway.autoscaling.enabled=false", "gateway.autoscaling.waitingRequests.enabled=true"], "needs gateway"),
    ],
)
def test_combinations_that_lose_experts_or_cannot_work_are_refused(settings, message):
    result = render(*[a for s in settings for a in ("--set", s)])
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_explicit_pool_budget_below_the_copies_is_taken():
    result = render(
        "--set", "pools.count=4", "--set", "pools.replicasPerExpert=3", "--set", "pools.pdb.maxUnavailable=1"
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert one(docs, "PodDisruptionBudget", "-pools")["spec"]["maxUnavailable"] == 1
    off = render("--set", "pools.pdb.enabled=false", "--set", "gateway.pdb.enabled=false")
    assert off.returncode == 0 and "PodDisruptionBudget" not in off.stdout, off.stderr


def test_gateway_scales_on_queue_depth_when_asked(rendered):
    name, _, docs = rendered
    gateway = one(docs, "Deployment", "-gateway")
    scaled = by_kind(docs, "ScaledObject")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if name == "queue-keda-monitors":  # KEDA's own HPA: the chart renders none beside it
        assert not hpas and len(scaled) == 1
        spec = scaled[0]["spec"]
        assert scaled[0]["apiVersion"] == "keda.sh/v1alpha1"
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": gateway["metadata"]["name"]}
        assert spec["scaleTargetRef"] == target
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
        triggers = {t["type"]: t for t in spec["triggers"]}
        assert set(triggers) == {"prometheus", "cpu"}
        for t in spec["triggers"]:  # KEDA's CRD: metadata is a map of strings
            assert all(isinstance(v, str) for v in t["metadata"].values()), t
        prom = triggers["prometheus"]
        assert prom["metricType"] == "AverageValue" and prom["metadata"]["threshold"] == "8"
        query = 'sum(num_requests_waiting{namespace="serving",pod=~"demo-expertmesh-gateway-.+"})'
        assert prom["metadata"]["query"] == query
        assert triggers["cpu"]["metadata"]["value"] == "70"
        return
    assert not scaled
    if name == "hostpath-gpu":
        assert not hpas
        return
    (hpa,) = hpas
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"  # CPU always counts
    if name == "queue-hpa":
        pods = metrics["Pods"]["pods"]
        assert pods["metric"]["name"] == "num_requests_waiting"
        assert pods["target"] == {"type": "AverageValue", "averageValue": "8"}
    else:
        assert set(metrics) == {"Resource"}


def test_gateway_services_affinity_and_prometheus_monitors(rendered):
    name, _, docs = rendered
    if name != "queue-keda-monitors":
        assert not [d for d in docs if d["metadata"]["name"].endswith("-headless")]
        assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PodMonitor")
    assert one(docs, "Service", "-gateway")["spec"]["sessionAffinity"] == (
        "ClientIP" if name == "queue-keda-monitors" else "None"
    )
    if name != "queue-keda-monitors":
        return
    headless = one(docs, "Service", "-gateway-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]  # no second metrics target for a monitor
    assert headless["spec"]["selector"] == one(docs, "Service", "-gateway")["spec"]["selector"]
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    chosen = [svc for svc in by_kind(docs, "Service") if _selects(sm["spec"]["selector"], svc["metadata"]["labels"])]
    scraped = {svc["metadata"]["name"] for svc in chosen if "metrics" in [p["name"] for p in svc["spec"]["ports"]]}
    assert scraped == {"demo-expertmesh-gateway", "demo-expertmesh-pools"}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    (pm,) = by_kind(docs, "PodMonitor")
    pods = [
        w
        for w in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
        if _selects(pm["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
    ]
    assert {w["metadata"]["name"] for w in pods} == {
        "demo-expertmesh-gateway",
        "demo-expertmesh-pools",
        "demo-expertmesh-autoscaler",
    }
    for w in pods:
        assert "metrics" in [p["name"] for p in w["spec"]["template"]["spec"]["containers"][0]["ports"]]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def _selects(selector, labels) -> bool:
    if not selector["matchLabels"].items() <= labels.items():
        return False
    expressions = [e for e in selector.get("matchExpressions", []) if e["operator"] == "In"]
    return all(labels.get(e["key"]) in e["values"] for e in expressions)


def test_autoscaler_replicas_comment_is_true():
    """values.yaml says >1 autoscaler replicas are standbys behind a Lease: the elector's defaults must say so too."""
    from services.autoscaler.kubernetes_actuator import LeaseElector

    text = (CHART / "values.yaml").read_text()
    elector = LeaseElector(None, "ns", "lease", "me")
    assert f"renewed on a thread of its own every {elector.retry_period:g} s" in text
    assert f"within {elector.renew_deadline:g} s" in text and f"the {elector.duration:g} s Lease" in text


def test_mutual_tls_mounts_the_secret_and_probes_over_it(rendered):
    name, _, docs = rendered
    if name != "mutual-tls":
        return
    for kind, suffix in [("Deployment", "-gateway"), ("StatefulSet", "-pools"), ("Deployment", "-autoscaler")]:
        spec = one(docs, kind, suffix)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EXPERTMESH_TLS_DIR"] == "/etc/expertmesh/tls"
        assert {"name": "tls", "mountPath": "/etc/expertmesh/tls", "readOnly": True} in container["volumeMounts"]
        assert any(v.get("secret", {}).get("secretName") == "expertmesh-tls" for v in spec["volumes"])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container and suffix != "-autoscaler":
                assert "grpc" not in container[probe], f"{suffix} {probe}: the kubelet's gRPC probe cannot speak TLS"
                assert container[probe]["exec"]["command"][:3] == ["python", "-m", "services.rpc.health_probe"]
