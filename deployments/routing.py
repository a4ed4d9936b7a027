"""Conversions of one upload go to one conversion replica, whose input cache
(deployments/input_cache.py) then holds the upload's content features and f0 track.

An upload is named by `upload_key`: its tenant and the SHA-256 the ingress takes of its bytes as
they arrive. The job actor puts it in each conversion request; it routes the request (here) and
keys the replica's input cache.

A client that converts an upload again (another voice, key, index rate, ...) would otherwise reach
any of the conversion replicas, and each would compute the upload's features and pitch anew.
`UploadAffinityRouter` plugs into Serve's request-router extension (the router runs in the
caller: the job actor): it routes as Serve's default router does (the less busy of two random
replicas, this node's first), except that a conversion of an upload it routed before is offered
first to the replica that took it, and goes there whenever that one has room. A replica that
is full, gone or new changes nothing but the hit rate: the cache is keyed by content in the
replica, so a conversion routed anywhere converts the same.
"""
from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import LocalityMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

# The conversion request's field naming its upload (see `upload_key`).
UPLOAD_KEY_FIELD = "upload_key"
# Uploads whose replica the router remembers: at one GPU's ~50 jobs a second, the last ~80 s.
REMEMBERED_UPLOADS = 4096


def upload_key(tenant: str, upload_sha256: str | None) -> str | None:
    """The tenant's name for an upload's bytes: one tenant's uploads never share a replica or a
    cache entry with another's on content alone. None for a job stored without a digest (routed
    as Serve's default router would, its features and pitch computed, not cached)."""
    return None if upload_sha256 is None else f"{tenant}/{upload_sha256}"


def _upload_key(pending_request: PendingRequest | None) -> str | None:
    args = pending_request.args if pending_request is not None else ()
    return args[0].get(UPLOAD_KEY_FIELD) if args and isinstance(args[0], dict) else None


class UploadAffinityRouter(LocalityMixin, RequestRouter):
    def initialize_state(self, remembered_uploads: int = REMEMBERED_UPLOADS) -> None:
        self._holders: OrderedDict[str, ReplicaID] = OrderedDict()  # upload key -> replica, oldest first
        self._remembered_uploads = remembered_uploads

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks to try in order: the upload's last replica if it is still up, then two random
        ones (Serve takes the less busy of a rank and backs off when no rank has room)."""
        ranks = []
        holder = self._holders.get(_upload_key(pending_request) or "")
        if holder is not None and holder in self._replicas:
            ranks.append([self._replicas[holder]])
        candidates = [self._replicas[i] for i in self.apply_locality_routing(pending_request) if i in self._replicas]
        ranks.append(random.sample(candidates, min(2, len(candidates))))
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = _upload_key(pending_request)
        if key is None:
            return
        self._holders[key] = replica_id
        self._holders.move_to_end(key)
        while len(self._holders) > self._remembered_uploads:
            self._holders.popitem(last=False)


def upload_affinity_routing() -> dict:
    """`Deployment.options()` that route a deployment's calls by `UploadAffinityRouter`."""
    return {"request_router_config": RequestRouterConfig(request_router_class=UploadAffinityRouter)}
