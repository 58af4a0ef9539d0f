"""deploy/k8s: the core objects against Kubernetes' schemas, the KubeRay objects against what
KubeRay requires, and the references between them.

Kubernetes' own objects (and every pod template inside the KubeRay objects) are validated
offline, strictly (no unknown field), against the OpenAPI schemas the ``kubernetes-validate``
package ships. The KubeRay custom resources have no schema here: the checks of our own below
hold them to the fields the operator needs (ray.io/v1, KubeRay >= 1.6).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from deploy_support import (
    K8S,
    ROOT,
    fgd_env_names,
    k8s_documents,
    mlflow_accepts_host,
    unknown_env_names,
)

K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest minors checked
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
KUBERAY_KINDS = {"RayCluster", "RayJob"}
# Secrets the operator creates (docs/cluster.md), with the keys the manifests read.
SECRETS = {
    "fgd-postgres": {"database-url", "mlflow-backend-store-uri"},
    "fgd-s3": {"access-key-id", "secret-access-key"},
    "fgd-api": {"secret-key"},
    "fgd-ray-auth": {"auth_token"},  # the key KubeRay's authOptions.secretName requires
}
# Fields of ray.io/v1 used here, as KubeRay's API reference names them.
RAY_CLUSTER_SPEC = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "authOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "suspend",
    "headServiceAnnotations",
    "gcsFaultToleranceOptions",
}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "idleTimeoutSeconds",
    "suspend",
    "numOfHosts",
    "scaleStrategy",
}
RAY_JOB_SPEC = {
    "entrypoint",
    "rayClusterSpec",
    "clusterSelector",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "runtimeEnvYAML",
    "submissionMode",
    "submitterPodTemplate",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "suspend",
    "metadata",
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in MANIFESTS for doc in k8s_documents(K8S / name)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _documents() if doc["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def _cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for cluster in _by_kind("RayCluster"):
        yield f"RayCluster/{cluster['metadata']['name']}", cluster["spec"]
    for job in _by_kind("RayJob"):
        yield f"RayJob/{job['metadata']['name']}", job["spec"]["rayClusterSpec"]


def _pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template: Deployments', and the Ray head's and workers' of KubeRay objects."""
    for deploy in _by_kind("Deployment"):
        yield f"Deployment/{deploy['metadata']['name']}", deploy["spec"]["template"]
    for where, spec in _cluster_specs():
        yield f"{where}/head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield f"{where}/{group['groupName']}", group["template"]


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in _pod_templates():
        for container in template["spec"]["containers"]:
            yield f"{where}/{container['name']}", container


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_match_their_schemas(version: str) -> None:
    import kubernetes_validate

    checked = 0
    for name, doc in _documents():
        if doc["kind"] in KUBERAY_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    kinds = {doc["kind"] for _, doc in _documents()}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert checked >= 6


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_pod_templates_of_the_ray_objects_match_the_pod_schema(version: str) -> None:
    import kubernetes_validate

    for where, template in _pod_templates():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        try:
            kubernetes_validate.validate({**wrapped, "template": template}, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")


def test_the_validator_refuses_a_wrong_field() -> None:
    import kubernetes_validate

    deploy = _named("Deployment", "fgd-api")
    broken = json.loads(json.dumps(deploy))
    broken["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRefx"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _check_group(where: str, group: dict[str, Any], allowed: set[str]) -> None:
    assert set(group) <= allowed, f"{where}: unknown fields {set(group) - allowed}"
    params = group["rayStartParams"]
    assert isinstance(params, dict), where
    # KubeRay passes each as --key=value: values must be strings
    assert all(isinstance(v, str) for v in params.values()), f"{where}: {params}"
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers), where
    assert "block" not in params, f"{where}: KubeRay adds --block itself"


def test_ray_clusters_have_what_kuberay_requires() -> None:
    assert _by_kind("RayCluster"), "no RayCluster"
    for where, spec in _cluster_specs():
        assert set(spec) <= RAY_CLUSTER_SPEC, f"{where}: unknown {set(spec) - RAY_CLUSTER_SPEC}"
        assert spec["rayVersion"], where
        head = spec["headGroupSpec"]
        _check_group(f"{where}/head", head, HEAD_GROUP)
        assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", where
        head_ports = {
            p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
        }
        assert {6379, 8265} <= head_ports, where
        groups = spec["workerGroupSpecs"]
        assert groups and len({g["groupName"] for g in groups}) == len(groups), where
        for group in groups:
            _check_group(f"{where}/{group.get('groupName')}", group, WORKER_GROUP)
            lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
            assert all(isinstance(v, int) for v in (lo, n, hi)), where
            assert 0 <= lo <= n <= hi, f"{where}/{group['groupName']}: {lo} <= {n} <= {hi}"
        auth = spec.get("authOptions")
        assert auth and auth["mode"] == "token" and auth["secretName"] in SECRETS, where


def test_the_ray_cluster_autoscales() -> None:
    (cluster,) = _by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["version"] in ("v1", "v2")
    assert options["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert isinstance(options["idleTimeoutSeconds"], int)
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])
    # no trials on the head; the workers (a GPU group too, from zero) take them
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["minReplicas"] == 0
    limits = gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_the_ray_job_example_runs_the_workers_entrypoint_on_a_spec_that_validates() -> None:
    from service.ray_dispatch import ENTRYPOINT_MODULE
    from workers.entrypoint import _parser, read_spec
    from workers.spec import JobSpec

    (job,) = _by_kind("RayJob")
    spec = job["spec"]
    assert set(spec) <= RAY_JOB_SPEC, set(spec) - RAY_JOB_SPEC
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", ENTRYPOINT_MODULE]
    args = _parser().parse_args(argv[3:])
    assert args.job_id and not args.noop
    # the spec file is the ConfigMap's key, mounted on the head, where the driver runs
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    (name,) = [n for n, path in mounts.items() if args.spec_json.startswith(path + "/")]
    config_map = _named("ConfigMap", volumes[name]["configMap"]["name"])
    key = args.spec_json.removeprefix(mounts[name] + "/")
    text = config_map["data"][key]
    job_spec = JobSpec.model_validate(read_spec(text))
    assert job_spec.sweep is not None and job_spec.sweep.num_samples > 1
    # its data is on the shared volume
    assert job_spec.data.shapes is not None
    assert str(job_spec.data.shapes.root).startswith("/fgd/data/")


def _env_refs(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for item in container.get("env") or []:
        yield item["name"], item


def test_secrets_are_referenced_by_name_never_written() -> None:
    assert not _by_kind("Secret"), "Secrets are created by the operator, not kept here"
    used: dict[str, set[str]] = {}
    for where, container in _containers():
        for name, item in _env_refs(container):
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                used.setdefault(ref["name"], set()).add(ref["key"])
            elif any(s in name for s in ("PASSWORD", "SECRET", "TOKEN")):
                pytest.fail(f"{where}: {name} is written in the manifest")
    for _, spec in _cluster_specs():
        used.setdefault(spec["authOptions"]["secretName"], set()).add("auth_token")
    assert used == SECRETS
    # the docs say how to create each Secret with exactly these keys
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for secret, keys in SECRETS.items():
        assert f"create secret generic {secret}" in doc, secret
        for key in keys:
            assert f"--from-literal={key}=" in doc, f"{secret}: {key}"


def test_environment_names_are_the_ones_the_code_reads() -> None:
    config = _named("ConfigMap", "fgd-config")["data"]
    assert not unknown_env_names(set(config)), unknown_env_names(set(config))
    for where, container in _containers():
        names = {name for name, _ in _env_refs(container)}
        assert not unknown_env_names(names), f"{where}: {unknown_env_names(names)}"
        refs = [e["configMapRef"]["name"] for e in container.get("envFrom") or []]
        assert refs == ["fgd-config"], where
    assert {n for n in config if n.startswith("FGD_")} <= fgd_env_names()


def test_the_services_find_each_other() -> None:
    config = _named("ConfigMap", "fgd-config")["data"]
    api = _named("Deployment", "fgd-api")["spec"]["template"]["spec"]["containers"][0]
    api_env = {name: item.get("value") for name, item in _env_refs(api)}
    # the KubeRay head service of the RayCluster, on the dashboard port
    (cluster,) = _by_kind("RayCluster")
    assert api_env["RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert api_env["RAY_AUTH_MODE"] == "token"
    # MLflow's Service, on its port, and MLflow accepts that host name
    service = _named("Service", "fgd-mlflow")
    port = service["spec"]["ports"][0]["port"]
    assert config["MLFLOW_TRACKING_URI"] == f"http://fgd-mlflow:{port}"
    mlflow = _named("Deployment", "fgd-mlflow")["spec"]["template"]["spec"]["containers"][0]
    flags = dict(a.partition("=")[::2] for a in mlflow["command"] if a.startswith("--"))
    assert f"--port={mlflow['ports'][0]['containerPort']}" in mlflow["command"]
    assert "--serve-artifacts" in flags
    for uri in (config["MLFLOW_TRACKING_URI"], f"http://fgd-mlflow.fgd.svc.cluster.local:{port}"):
        assert mlflow_accepts_host(flags["--allowed-hosts"], uri), uri
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert config["FGD_TUNE_STORAGE"].startswith("s3://")
    # each Service selects its Deployment's pods, on a port its container names
    for deploy in _by_kind("Deployment"):
        name = deploy["metadata"]["name"]
        svc = _named("Service", name)
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), name
        assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        names = {
            p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names, name


def test_the_datasets_are_one_volume_at_one_path_everywhere() -> None:
    (claim,) = _by_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    data_root = _named("ConfigMap", "fgd-config")["data"]["FGD_DATA_ROOTS"]
    for where, template in _pod_templates():
        if "fgd-mlflow" in where:
            continue
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (mount,) = [
            m
            for c in template["spec"]["containers"]
            for m in c["volumeMounts"]
            if volumes[m["name"]].get("persistentVolumeClaim")
        ]
        claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim_name == claim["metadata"]["name"], where
        assert mount["mountPath"] == data_root, where


def test_the_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == set(MANIFESTS) - {"rayjob-example.yaml"}
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name


def test_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here (kustomize runs inside it)")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {
        (d["kind"], d["metadata"]["name"])
        for name in kustomization["resources"]
        for d in k8s_documents(K8S / name)
    }
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == expected
    assert {d["metadata"]["namespace"] for d in rendered} == {kustomization["namespace"]}
