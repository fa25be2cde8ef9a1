"""The standard gRPC health service (grpc.health.v1.Health, from grpcio-health-checking) over
the ingress's own readiness (Ingress.Health: tokenizer and engine answer), so Kubernetes gRPC
probes, grpc_health_probe and load balancers can check the cluster without our protos.

Service names: "" (the whole server) and "medusa.v1.Medusa" report the same status; any other
name is NOT_FOUND, as the health protocol asks. Watch sends the status when it changes.

Knows the health protocol; nothing of what makes a component healthy."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2

from medusa.proto.v1 import medusa_pb2 as pb

SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
SERVICES = ("", "medusa.v1.Medusa")
WATCH_PERIOD_S = 5.0


class UnknownService(Exception):
    """A health check for a service this server does not have."""


async def status(ingress, service: str) -> int:
    if service not in SERVICES:
        raise UnknownService(f"unknown service {service!r}: this server has {', '.join(repr(s) for s in SERVICES)}")
    resp = await ingress.Health(pb.HealthRequest())
    return health_pb2.HealthCheckResponse.SERVING if resp.status == pb.HealthResponse.SERVING \
        else health_pb2.HealthCheckResponse.NOT_SERVING


async def check(ingress, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
    try:
        return health_pb2.HealthCheckResponse(status=await status(ingress, request.service))
    except UnknownService as e:
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(str(e))
        raise


async def watch(ingress, request: health_pb2.HealthCheckRequest, grpc_context=None):
    """The status now, then again each time it changes (polled every WATCH_PERIOD_S)."""
    last = None
    while True:
        try:
            now = await status(ingress, request.service)
        except UnknownService:
            now = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if now != last:
            last = now
            yield health_pb2.HealthCheckResponse(status=now)
        await asyncio.sleep(WATCH_PERIOD_S)


class HealthMixin:
    """Check / Watch methods for an Ingress (Serve's gRPC proxy calls the ingress's methods by name)."""

    async def Check(self, request, grpc_context=None):
        return await check(self, request, grpc_context)

    async def Watch(self, request, grpc_context=None):
        async for resp in watch(self, request, grpc_context):
            yield resp
