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
    "hostpath-gpu": ["--set", "model.volume.type=hostPath", "--set", "pools.gpu=1", "--set", "gateway.gpu=1",
                     "--set", "gateway.autoscaling.enabled=false", "--set", "autoscaler.enabled=false"],
    "tracing": ["--set", "tracing.otlpEndpoint=http://otel:4317", "--set", "pools.count=8"],
}


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, "template", "demo", str(CHART), "--namespace", "serving", *args],
                          capture_output=True, text=True)


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
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
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
    _, _, docs = rendered
    gateway = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    pools = one(docs, "StatefulSet", "-pools")["spec"]["template"]["spec"]
    for spec, service in ((gateway, "expertmesh.v1.GatewayService"), (pools, "expertmesh.v1.ExpertPoolService")):
        c = spec["containers"][0]
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
        hpa = one(docs, "HorizontalPodAutoscaler", "-gateway")
        assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
        assert gateway["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    if name == "tracing":
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"
        assert one(docs, "StatefulSet", "-pools")["spec"]["replicas"] == 8
        assert "--bootstrap-pools=8" in one(docs, "Deployment", "-autoscaler")["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("setting,message", [
    ("gateway.dispatchDtype=fp16", "dispatchDtype"),
    ("pools.count=0", "count"),
    ("model.volume.type=nfs", "type"),
    ("autoscaler.rebalanceThreshold=1.5", "rebalanceThreshold"),
    ("redis.external.url=http://nope", "url"),
    ("gateway.unknownKey=1", "unknownKey"),
])
def test_schema_rejects_bad_values(setting, message):
    result = render("--set", setting)
    assert result.returncode != 0
    assert message in result.stderr


def test_notes_render():
    result = subprocess.run([HELM, "install", "demo", str(CHART), "--dry-run=client", "--namespace", "serving"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "expertmesh generate --target 127.0.0.1:50051" in result.stdout
