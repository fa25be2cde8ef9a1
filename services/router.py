"""Ray glue for session affinity: a Serve RequestRouter for the engine deployment whose
choose_replicas applies services.routing.route to (the session's recorded replica, carried in
the request payload as "affinity", and the replicas' queue lengths Serve already tracks).

Serve tries the ranks in order and, within a rank, the replica with the shortest queue that
accepts; a full or vanished preferred replica falls through to the least-loaded ones (the
session is then re-prefilled there and the ingress records the new replica). The policy
lives in services.routing; this class only adapts types and adds a span."""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from services import telemetry
from services.routing import route


def _payload(pending: Optional[PendingRequest]) -> dict | None:
    if pending is None:
        return None
    for a in list(pending.args) + list(pending.kwargs.values()):
        if isinstance(a, dict) and ("prompt_ids" in a or "affinity" in a):  # a request, or a bare {"affinity": id}
            return a
    return None


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, tracing: str | None = None, **kwargs):
        self._tracer = telemetry.setup("router", tracing)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        payload = _payload(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self.replica_queue_len_cache.get(r.replica_id) for rid, r in by_id.items()}
        hint = payload.get("affinity") if payload else None
        decision = route(hint, loads, has_session=bool(payload and payload.get("session")))
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all replicas are ranked: back off when none accepts
        if payload is not None and payload.get("trace"):
            tracer = getattr(self, "_tracer", None) or telemetry.setup("router")
            with tracer.start_as_current_span("router.choose_replicas", context=telemetry.extract(payload["trace"])) as span:
                span.set_attribute("medusa.route", decision.reason)
                span.set_attribute("medusa.session_replica", hint or "")
                span.set_attribute("medusa.candidates", len(by_id))
        return [[by_id[i] for i in rank] for rank in decision.ranks]
