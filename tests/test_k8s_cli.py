"""`rvc-serve k8s` against a Kubernetes API emulator on loopback (real HTTP, the real
`kubernetes` client, a real kubeconfig): create, patch, status polling, timeout, delete."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deployments.cli import main as cli_main
from deployments.k8s_api import GROUP, PLURAL, VERSION
from deployments.k8s_manifests import Overlay, rayservice
from tests.k8s_emulator import Emulator
from tests.test_k8s_manifests import K8S, REPO

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlays")
NAMESPACE = "rvc-dev"


@pytest.fixture
def cluster(tmp_path):
    with Emulator() as emulator:
        emulator.kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
        yield emulator


def _run(cluster, capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(["k8s", *args, "--k8s-dir", str(K8S), "--kubeconfig", str(cluster.kubeconfig)])
    out, err = capsys.readouterr()
    return rc, out, err


def _get(cluster) -> dict:
    return client.CustomObjectsApi(cluster.api()).get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "rvc")


def _set_status(cluster, status: dict) -> None:
    # What KubeRay does: write the status subresource.
    client.CustomObjectsApi(cluster.api()).patch_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, "rvc", {"status": status})


def _condition(kind: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


def test_apply_creates_everything_then_patches(cluster, capsys, tmp_path):
    rc, out, _ = _run(cluster, capsys, "apply", "cpu-dev")
    assert rc == 0
    assert out.splitlines() == ["secret rvc-dev/rvc-secrets: created",
                                "persistentvolumeclaim rvc-dev/rvc-data: created", "rayservice rvc-dev/rvc: created"]
    rendered = rayservice(Overlay(K8S, "cpu-dev").render())
    assert _get(cluster)["spec"] == rendered["spec"]
    pvc = client.CoreV1Api(cluster.api()).read_namespaced_persistent_volume_claim("rvc-data", NAMESPACE)
    assert pvc.spec.access_modes == ["ReadWriteOnce"]

    # Change the serve config, regenerate, apply again: every object is patched in place.
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "serve_config.yaml").write_text(
        (REPO / "serve_config.yaml").read_text().replace("job_timeout_s: 900", "job_timeout_s: 450"))
    changed = ["--k8s-dir", str(tmp_path / "k8s")]
    assert cli_main(["k8s", "render", "cpu-dev", "--update", *changed]) == 0
    assert "job_timeout_s: 450" in capsys.readouterr().out
    assert cli_main(["k8s", "apply", "cpu-dev", *changed, "--kubeconfig", str(cluster.kubeconfig)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "rayservice rvc-dev/rvc: patched"
    assert "job_timeout_s: 450" in _get(cluster)["spec"]["serveConfigV2"]
    assert cluster.count_requests("PATCH", "rayservices") == 1


def test_apply_refuses_a_drifted_overlay_before_touching_the_cluster(cluster, capsys, tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "serve_config.yaml").write_text(
        (REPO / "serve_config.yaml").read_text().replace("job_attempts: 3", "job_attempts: 2"))
    rc = cli_main(["k8s", "apply", "cpu-dev", "--k8s-dir", str(tmp_path / "k8s"),
                   "--kubeconfig", str(cluster.kubeconfig)])
    assert rc == 2 and "render cpu-dev --update" in capsys.readouterr().err
    assert cluster.count_requests("POST", "rayservices") == 0


def test_status_polls_until_ready(cluster, capsys):
    assert _run(cluster, capsys, "apply", "cpu-dev")[0] == 0
    _set_status(cluster, {"conditions": [_condition("Ready", "False", "Initializing"),
                                         _condition("UpgradeInProgress", "False", "NoPendingCluster")],
                          "numServeEndpoints": 0})

    def become_ready() -> None:  # once the CLI has seen the not-ready status twice
        deadline = time.monotonic() + 30
        while cluster.count_requests("GET", "rayservices") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        _set_status(cluster, {
            "conditions": [_condition("Ready", "True", "NonZeroServeEndpoints"),
                           _condition("UpgradeInProgress", "False", "NoPendingCluster")],
            "numServeEndpoints": 2,
            "activeServiceStatus": {"applicationStatuses": {"rvc": {"status": "RUNNING"}}}})

    flipper = threading.Thread(target=become_ready)
    flipper.start()
    rc, out, _ = _run(cluster, capsys, "status", "cpu-dev", "--timeout", "60", "--interval", "0.02")
    flipper.join()
    assert rc == 0
    blocks = out.split("rayservice rvc-dev/rvc\n")[1:]
    first, last = blocks[0], blocks[-1]
    assert "Ready: False (Initializing)" in first and "serve endpoints: 0" in first
    assert last.splitlines() == ["  Ready: True (NonZeroServeEndpoints)", "  UpgradeInProgress: False (NoPendingCluster)",
                                 "  serve endpoints: 2", "  application rvc: RUNNING"]
    assert cluster.count_requests("GET", "rayservices") >= 3


def test_status_fails_when_not_ready_before_the_timeout(cluster, capsys):
    assert _run(cluster, capsys, "apply", "cpu-dev")[0] == 0
    rc, out, err = _run(cluster, capsys, "status", "cpu-dev")  # no status from the operator yet
    assert rc == 1 and "Ready: Unknown" in out
    _set_status(cluster, {"conditions": [
        _condition("Ready", "True", "NonZeroServeEndpoints"),
        _condition("UpgradeInProgress", "True", "BothActivePendingClustersExist", "new cluster starting")],
        "numServeEndpoints": 0})
    _set_status(cluster, {"conditions": [
        _condition("Ready", "False", "ZeroServeEndpoints"),
        _condition("UpgradeInProgress", "True", "BothActivePendingClustersExist", "new cluster starting")]})
    polls = cluster.count_requests("GET", "rayservices")
    rc, out, err = _run(cluster, capsys, "status", "cpu-dev", "--timeout", "0.3", "--interval", "0.05")
    assert rc == 1 and err.strip() == "not ready after 0.3 s"
    assert "Ready: False (ZeroServeEndpoints)" in out
    assert "UpgradeInProgress: True (BothActivePendingClustersExist; new cluster starting)" in out
    assert out.count("rayservice rvc-dev/rvc") == 1  # an unchanged status is printed once
    assert cluster.count_requests("GET", "rayservices") - polls >= 3  # it polled until the deadline


def test_delete_removes_the_rayservice_and_keeps_the_data(cluster, capsys):
    assert _run(cluster, capsys, "apply", "cpu-dev")[0] == 0
    rc, out, _ = _run(cluster, capsys, "delete", "cpu-dev")
    assert rc == 0 and out.startswith("rayservice rvc-dev/rvc: deleted")
    with pytest.raises(ApiException) as missing:
        _get(cluster)
    assert missing.value.status == 404
    client.CoreV1Api(cluster.api()).read_namespaced_persistent_volume_claim("rvc-data", NAMESPACE)
    rc, out, _ = _run(cluster, capsys, "delete", "cpu-dev")
    assert rc == 0 and out.startswith("rayservice rvc-dev/rvc: not found")
    rc, _, err = _run(cluster, capsys, "status", "cpu-dev")
    assert rc == 2 and err.strip() == "error: Kubernetes API: 404 Not Found"


def test_an_unreachable_cluster_is_a_clear_error(tmp_path, capsys):
    with Emulator() as emulator:
        kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    # The emulator is gone: its port refuses connections.
    rc = cli_main(["k8s", "status", "cpu-dev", "--k8s-dir", str(K8S), "--kubeconfig", str(kubeconfig)])
    assert rc == 2 and capsys.readouterr().err.startswith("error: cannot reach the cluster")
