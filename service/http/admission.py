"""Admission on HTTP: `POST /upscale` and `/v2/.../infer` refused from their headers while the worker's Admission is full.

The refusal is answered here, before routing, dependencies or the body: under overload most requests are
refusals, and each one's cost is taken from the requests being served (service.runtime.admission).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response
from service.observability.metrics import UNKNOWN_MODEL, Metrics
from service.runtime.admission import Admission, Slot
from service.runtime.cancellation import ClientGone

ARRIVAL = "upgrader.arrival"  # ASGI scope key: the weight a request was let in with, until its route takes it over


def admitted(scope: Scope) -> bool:
    """The requests that take an admission slot: POST /upscale and the OIP's infer routes."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path = scope["path"]
    return path == "/upscale" or (path.startswith("/v2/models/") and path.endswith("/infer"))


def slot(admission: Admission, scope: Scope, max_images: int, wait_s: float, gone: ClientGone | None = None) -> Slot:
    """The request's slot (`async with` it): the weight it was let in with from its headers (AdmissionMiddleware), or
    estimated now from its Content-Length."""
    arrival = scope.pop(ARRIVAL, None)
    weight = arrival[0] if arrival is not None else admission.weight(Headers(scope=scope).get("content-length"), max_images)
    return admission.slot(weight, wait_s, gone, arrival)


class AdmissionMiddleware:
    """503 + Retry-After from the headers while admission is full; else counted as arriving until the route takes a slot.

    The refused request's body is left unread (the server drops it and keeps the connection)."""

    def __init__(self, app: ASGIApp, admission: Admission, metrics: Metrics, max_images_per_request: int) -> None:
        self.app, self.admission, self.max_images = app, admission, max_images_per_request
        self.metrics = metrics
        self.refused = None  # the 503 counter, looked up at the first refusal (no zero series before one)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not admitted(scope):
            return await self.app(scope, receive, send)
        admission = self.admission
        if admission.full():
            if self.refused is None:
                self.refused = self.metrics.requests.labels(UNKNOWN_MODEL, "503")
            self.refused.inc()
            exc = admission.refuse_now()
            headers = exc.headers
            if Headers(scope=scope).get("expect", "").lower() == "100-continue":
                # The client waits for 100 Continue before its body and never sends it after a final answer: close.
                headers = {**headers, "Connection": "close"}
            return await error_response(exc.status, exc.code, exc.message, headers=headers, path=scope["path"])(scope, receive, send)
        arrival = scope[ARRIVAL] = admission.arrive(admission.weight(Headers(scope=scope).get("content-length"), self.max_images))
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.pop(ARRIVAL, None) is not None:  # it ended before its route took a slot (401, 404, 422, ...)
                admission.arrived(arrival)
