"""Rendered objects to a cluster and back, with the `kubernetes` client: create-or-patch, the
RayService's status, delete.

The RayService goes through `CustomObjectsApi` (group ray.io, version v1, plural rayservices)
as a JSON merge patch: keys the manifest sets are set, lists replaced whole; a key removed from
the manifest stays in the cluster until the object is recreated.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .k8s_manifests import RAYSERVICE_API

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
# The conditions KubeRay sets on a RayService, in the order they are printed.
CONDITIONS = ("Ready", "UpgradeInProgress", "RollbackInProgress", "Suspending", "Suspended")
# The namespaced core kinds the overlays render: (API class, method suffix). The namespace itself
# is the operator's to create, with the Secrets (docs/kubernetes.md).
CORE_KINDS: dict[tuple[str, str], tuple[type, str]] = {
    ("v1", "Secret"): (client.CoreV1Api, "namespaced_secret"),
    ("v1", "PersistentVolumeClaim"): (client.CoreV1Api, "namespaced_persistent_volume_claim"),
    ("v1", "Service"): (client.CoreV1Api, "namespaced_service"),
    ("networking.k8s.io/v1", "Ingress"): (client.NetworkingV1Api, "namespaced_ingress"),
}


def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """A client for the kubeconfig's (current or named) context."""
    return config.new_client_from_config(config_file=kubeconfig, context=context)


def describe(obj: dict) -> str:
    return f"{obj['kind'].lower()} {obj['metadata']['namespace']}/{obj['metadata']['name']}"


def apply(api: client.ApiClient, obj: dict) -> str:
    """Create the object, or merge-patch it when it exists; returns "created" or "patched"."""
    create, patch = _writers(api, obj)
    try:
        create(obj)
        return "created"
    except ApiException as exc:
        if exc.status != 409:
            raise
    patch(obj)
    return "patched"


def _writers(api: client.ApiClient, obj: dict) -> tuple[Callable[[dict], object], Callable[[dict], object]]:
    name, namespace = obj["metadata"]["name"], obj["metadata"].get("namespace")
    key = (obj["apiVersion"], obj["kind"])
    if key == RAYSERVICE_API:
        custom = client.CustomObjectsApi(api)
        return (lambda body: custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body),
                lambda body: custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body))
    if key not in CORE_KINDS:
        raise ValueError(f"rvc-serve k8s does not apply {obj['apiVersion']} {obj['kind']}")
    api_class, suffix = CORE_KINDS[key]
    core = api_class(api)
    create, patch = getattr(core, f"create_{suffix}"), getattr(core, f"patch_{suffix}")
    return (lambda body: create(namespace, body)), (lambda body: patch(name, namespace, body))


@dataclass
class RayServiceStatus:
    """What KubeRay reports about a RayService."""

    conditions: dict[str, dict] = field(default_factory=dict)  # type → the condition
    endpoints: int = 0
    applications: dict[str, str] = field(default_factory=dict)  # Serve application → its status

    @classmethod
    def of(cls, obj: dict) -> RayServiceStatus:
        status = obj.get("status") or {}
        apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
        return cls(conditions={c["type"]: c for c in status.get("conditions") or [] if "type" in c},
                   endpoints=int(status.get("numServeEndpoints") or 0),
                   applications={name: app.get("status", "?") for name, app in apps.items()})

    @property
    def ready(self) -> bool:
        return self.conditions.get("Ready", {}).get("status") == "True"

    def lines(self) -> list[str]:
        out = []
        for kind in (*CONDITIONS, *sorted(set(self.conditions) - set(CONDITIONS))):
            condition = self.conditions.get(kind)
            if condition is None:
                continue
            detail = "; ".join(v for v in (condition.get("reason"), condition.get("message")) if v)
            out.append(f"{kind}: {condition.get('status', 'Unknown')}" + (f" ({detail})" if detail else ""))
        if "Ready" not in self.conditions:
            out.insert(0, "Ready: Unknown (no status from KubeRay yet)")
        out.append(f"serve endpoints: {self.endpoints}")
        out += [f"application {name}: {status}" for name, status in sorted(self.applications.items())]
        return out


def read_status(api: client.ApiClient, name: str, namespace: str) -> RayServiceStatus:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return RayServiceStatus.of(obj)


def wait_ready(api: client.ApiClient, name: str, namespace: str, timeout_s: float, interval_s: float,
               report: Callable[[RayServiceStatus], None]) -> bool:
    """Poll until the RayService is Ready or `timeout_s` passed; `report` sees each status that
    differs from the last. True when Ready."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        status = read_status(api, name, namespace)
        if status != last:
            report(status)
            last = status
        if status.ready:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval_s, remaining))


def delete(api: client.ApiClient, name: str, namespace: str) -> bool:
    """Delete the RayService; False when there was none."""
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
