"""The k8s/ overlays: every rendered object validated offline (the RayService against KubeRay
v1.7.0's CRD schema, leniently and with unknown keys refused; core objects against Kubernetes'
own schemas, strictly), the embedded Serve config generated from serve_config.yaml and valid,
and the deployment rules the overlays promise (GPU group, GCS fault tolerance, probes, ...)."""
from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deployments.ray_env import RAY_NODE_ENV
from deployments.k8s_manifests import Overlay, merge, rayservice
from deployments.serve_config import check_serve_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
CRD = REPO.parent / "shared" / "k8s-schemas" / "ray.io_rayservices.v1.7.0.yaml"
KUBERNETES_VERSION = "1.32"  # the kubectl here; kubernetes-validate ships every version's schemas

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlays")


def _strict(schema: dict) -> dict:
    """The schema refusing keys it does not define, wherever it defines properties (as
    `kubeconform -strict` does) and the field does not keep unknown fields on purpose."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


@pytest.fixture(scope="module")
def crd_validators() -> tuple[jsonschema.Draft7Validator, jsonschema.Draft7Validator]:
    if not CRD.is_file():
        pytest.skip(f"{CRD} is absent (the shared k8s-schemas folder beside the repository)")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB of YAML
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(_strict(schema))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays")
    return {name: Overlay(K8S, name).render() for name in OVERLAYS}


def _errors(validator: jsonschema.Draft7Validator, obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def _containers(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _worker_groups(service: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in service["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])}


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _app_args(service: dict) -> dict:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    return next(a for a in config["applications"] if a["name"] == "rvc")["args"]


def test_there_are_the_promised_overlays():
    assert {"cpu-dev", "gpu-prod"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_rayservice_matches_the_crd_schema_strictly(name, rendered, crd_validators):
    lenient, strict = crd_validators
    service = rayservice(rendered[name])
    assert _errors(lenient, service) == []
    assert _errors(strict, service) == []


def test_the_strict_schema_refuses_what_the_crd_lets_through(crd_validators):
    lenient, strict = crd_validators
    service = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
               "spec": {"serveConfigv2": "applications: []",  # misspelt: the operator would ignore it
                        "rayClusterConfig": {"headGroupSpec": {"template": {"spec": {"containers": [
                            {"name": "ray-head", "image": "i", "resourcess": {}}]}}}}}}
    assert _errors(lenient, service) == []
    assert sorted(e.split(":")[0] for e in _errors(strict, service)) == [
        "spec", "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0"]
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"] = [{"groupName": "g", "template": {}}]
    assert any("minReplicas" in e for e in _errors(lenient, service))


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_core_objects_match_the_kubernetes_schemas_strictly(name, rendered):
    core = [o for o in rendered[name] if o["apiVersion"] != "ray.io/v1"]
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    kinds = {o["kind"] for o in core}
    assert "PersistentVolumeClaim" in kinds
    assert ("Secret" in kinds) == (name == "cpu-dev") and ("Ingress" in kinds) == (name == "gpu-prod")


@needs_kubectl
def test_the_core_validator_refuses_unknown_keys(rendered):
    pvc = copy.deepcopy(next(o for o in rendered["cpu-dev"] if o["kind"] == "PersistentVolumeClaim"))
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_serve_config_is_generated_from_serve_config_yaml(name, rendered):
    overlay = Overlay(K8S, name)
    assert overlay.is_current(), f"{overlay.generated_path} drifted: run rvc-serve k8s render {name} --update"
    embedded = yaml.safe_load(rayservice(rendered[name])["spec"]["serveConfigV2"])
    assert embedded == overlay.serve_config()
    [settings] = check_serve_config(embedded)  # Ray's ServeDeploySchema, unknown keys, our builder's args
    # Everything serve_config.yaml says and no overlay overrides reaches the cluster unchanged.
    source = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert embedded["applications"][0]["import_path"] == source["applications"][0]["import_path"]
    assert settings.job_timeout_s == source["applications"][0]["args"]["job_timeout_s"]
    assert embedded["http_options"] == {**source["http_options"], "host": "0.0.0.0", "port": 8000}
    assert embedded["proxy_location"] == "EveryNode"


@needs_kubectl
def test_a_change_to_serve_config_yaml_is_caught_until_regenerated(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    source = tmp_path / "serve_config.yaml"
    source.write_text((REPO / "serve_config.yaml").read_text().replace("job_timeout_s: 900", "job_timeout_s: 600"))
    overlay = Overlay(tmp_path / "k8s", "gpu-prod")
    assert not overlay.is_current()
    with pytest.raises(ValueError, match="--update"):
        overlay.render()
    assert overlay.update() and not overlay.update()
    assert _app_args(rayservice(overlay.render()))["job_timeout_s"] == 600
    # A hand edit of the generated patch is drift too.
    generated = overlay.generated_path
    generated.write_text(generated.read_text().replace("max_concurrent_jobs: 64", "max_concurrent_jobs: 99"))
    with pytest.raises(ValueError, match="does not match"):
        overlay.render()
    # A Serve config the strict check refuses is never written.
    values = overlay.directory / "serve-values.yaml"
    values.write_text(values.read_text() + "proxy_locaton: HeadOnly\n")
    with pytest.raises(ValueError, match="proxy_locaton"):
        overlay.update()
    assert "99" in generated.read_text()


@needs_kubectl
def test_gpu_prod_deployment_rules(rendered):
    objects = rendered["gpu-prod"]
    service = rayservice(objects)
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True

    groups = _worker_groups(service)
    gpu = groups["gpu"]
    gpu_container = gpu["template"]["spec"]["containers"][0]
    gpus_per_pod = int(gpu_container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"][
        "tolerations"]
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
               for g, spec in groups.items() if g != "gpu" for c in spec["template"]["spec"]["containers"])
    # The GPU group holds the model stages at their min and max replicas (explicit shares).
    stages = _app_args(service)["stages"]
    model_stages = [stages[s] for s in ("features", "pitch", "synthesis")]
    assert all(isinstance(s["num_gpus"], (int, float)) and s["num_gpus"] > 0 for s in model_stages)
    assert gpu["minReplicas"] * gpus_per_pod >= sum(s["min_replicas"] * s["num_gpus"] for s in model_stages)
    assert gpu["maxReplicas"] * gpus_per_pod >= sum(s["max_replicas"] * s["num_gpus"] for s in model_stages)
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    # pm and harvest ask for no GPU; the CPU group holds them with the ingress and conversion
    # replicas at their max (Ray's autoscaler adds CPU pods, not GPU ones, for that demand).
    cpu_stages = [stages[s] for s in ("ingress", "conversion", "host_pitch")]
    assert stages["host_pitch"]["num_gpus"] == 0 and stages["host_pitch"]["num_cpus"] >= 1
    cpu = groups["cpu"]
    cpus_per_pod = float(cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpu["maxReplicas"] * cpus_per_pod >= sum(s["max_replicas"] * s["num_cpus"] for s in cpu_stages)

    # GCS fault tolerance in an external Redis, its password from a Secret; the job store in the
    # same Redis; nothing the operator refuses beside gcsFaultToleranceOptions.
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "rvc-redis", "key": "RVC_REDIS_PASSWORD"}
    assert "ray.io/ft-enabled" not in service["metadata"].get("annotations", {})
    for container in _containers(service):
        env = _env(container)
        assert re.fullmatch(rf"redis://{re.escape(ft['redisAddress'])}/\d+", env["RVC_JOB_STORE"])
        assert {"secretRef": {"name": "rvc-redis"}} in container["envFrom"]
        assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & set(env)

    ingress = next(o for o in objects if o["kind"] == "Ingress")
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.rstrip("m")) >= 50
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rvc-serve-svc", "port": {"number": 8000}}  # KubeRay's serve Service
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@needs_kubectl
def test_cpu_dev_has_no_gpu_and_keeps_sqlite(rendered):
    service = rayservice(rendered["cpu-dev"])
    assert all("nvidia.com/gpu" not in str(c["resources"]) for c in _containers(service))
    assert "gcsFaultToleranceOptions" not in service["spec"]["rayClusterConfig"]
    assert all(s["num_gpus"] == 0 for s in _app_args(service)["stages"].values())
    assert all("RVC_JOB_STORE" not in _env(c) for c in _containers(service))
    secret = next(o for o in rendered["cpu-dev"] if o["kind"] == "Secret")
    assert set(secret["data"]) == {"RVC_API_KEYS", "RVC_URL_SECRET"}


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_ray_container_is_provisioned_and_probed(name, rendered):
    objects = rendered[name]
    service = rayservice(objects)
    namespace = service["metadata"]["namespace"]
    assert {o["metadata"].get("namespace") for o in objects} == {namespace}
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    cluster = service["spec"]["rayClusterConfig"]
    args = _app_args(service)
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": pvc}} in pod["volumes"]
        for container in pod["containers"]:
            assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
            assert _env(container)["RVC_DATA_DIR"] == "/data"
            # Every node runs a Serve proxy: each must bound the request bodies it queues, and
            # hand requests on as the tests and benchmarks measured it.
            assert RAY_NODE_ENV.items() <= _env(container).items()
            assert {"secretRef": {"name": "rvc-secrets"}} in container["envFrom"]  # API keys, URL secret
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and requests == limits
    for group in cluster.get("workerGroupSpecs", []):
        # Serve replicas run on workers: they are probed through the Serve proxy on port 8000.
        container = group["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    # The head keeps KubeRay's probes: the operator and the workers reach it before Serve is up.
    assert "readinessProbe" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    # The image bakes the weights where the Serve config looks for them.
    dockerfile = (REPO / "Dockerfile").read_text()
    assert str(Path(args["hubert_path"]).parent) in dockerfile


def test_the_start_command_and_the_image_set_the_ray_node_environment():
    serve_sh = (REPO / "scripts" / "serve.sh").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    for name, value in RAY_NODE_ENV.items():
        assert re.search(rf"^export {name}={re.escape(value)}$", serve_sh, re.M), name
        assert re.search(rf"^\s*(ENV )?{name}={re.escape(value)}( \\)?$", dockerfile, re.M), name


def test_merge_overrides_key_by_key_and_applications_by_name():
    base = {"a": {"x": 1, "y": 2}, "applications": [{"name": "rvc", "args": {"p": 1, "q": 2}}, {"name": "other"}]}
    over = {"a": {"y": 3}, "applications": [{"name": "rvc", "args": {"q": 5}}, {"name": "new"}], "b": [1]}
    assert merge(base, over) == {"a": {"x": 1, "y": 3}, "b": [1], "applications": [
        {"name": "rvc", "args": {"p": 1, "q": 5}}, {"name": "other"}, {"name": "new"}]}
    assert merge({"l": [1, 2]}, {"l": [3]}) == {"l": [3]}

