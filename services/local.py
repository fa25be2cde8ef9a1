"""Run the services in one process without Ray: LocalHandle mimics a Serve deployment handle
(`h.method.remote(...)` awaitable, `h.options(stream=True).method.remote(...)` async iterator)
over a plain object, GrpcServicer (+ grpc.health.v1) exposes an Ingress on a grpc.aio server,
and start_http serves its OpenAI-compatible HTTP face with uvicorn. Used by the
unit tests and handy for debugging the request path.

Knows nothing of what the wrapped objects do."""
from __future__ import annotations

import asyncio
import inspect

import grpc

from grpc_health.v1 import health_pb2_grpc

from medusa.proto.v1 import medusa_pb2_grpc as pb_grpc
from services import health
from services.grpc_wire import add_MedusaServicer_to_server
from services.ingress import Ingress, ServiceAbort
from services.limits import StatusRecorder


class _Method:
    def __init__(self, fn, stream: bool):
        self.fn, self.stream = fn, stream

    def remote(self, *args, **kwargs):
        if self.stream:
            return self.fn(*args, **kwargs)
        return _call(self.fn, args, kwargs)


async def _call(fn, args, kwargs):
    out = fn(*args, **kwargs)
    return await out if inspect.isawaitable(out) else out


class LocalHandle:
    def __init__(self, obj, stream: bool = False):
        self._obj, self._stream = obj, stream

    def options(self, stream: bool = False, **_):
        return LocalHandle(self._obj, stream)

    def __getattr__(self, name):
        return _Method(getattr(self._obj, name), self._stream)


class _Context(StatusRecorder):
    """The part of a grpc context the Ingress uses (like Ray Serve's RayServegRPCContext)."""

    def __init__(self, ctx: grpc.aio.ServicerContext):
        super().__init__()
        self._ctx = ctx

    def invocation_metadata(self):
        return self._ctx.invocation_metadata()

    async def finish(self):
        """Send the status the ingress set (as Serve's proxy does)."""
        if self.code is not None and self.code != grpc.StatusCode.OK:
            if self.trailing:
                self._ctx.set_trailing_metadata(tuple(self.trailing))
            await self._ctx.abort(self.code, self.details)


class GrpcServicer(pb_grpc.MedusaServicer):
    def __init__(self, ingress: Ingress):
        self.ingress = ingress

    async def Generate(self, request, context):
        ctx = _Context(context)
        try:
            async for resp in self.ingress.Generate(request, ctx):
                if resp.WhichOneof("event") is not None or ctx.code is None:
                    yield resp
        except ServiceAbort as e:
            await context.abort(e.code, e.details)
        await ctx.finish()

    async def _unary(self, name, request, context):
        ctx = _Context(context)
        try:
            out = await getattr(self.ingress, name)(request, ctx)
        except ServiceAbort as e:
            await context.abort(e.code, e.details)
        await ctx.finish()
        return out

    async def Tokenize(self, request, context):
        return await self._unary("Tokenize", request, context)

    async def ListModels(self, request, context):
        return await self._unary("ListModels", request, context)

    async def Health(self, request, context):
        return await self._unary("Health", request, context)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 over an Ingress (services.health)."""

    def __init__(self, ingress: Ingress):
        self.ingress = ingress

    async def Check(self, request, context):
        try:
            return await health.check(self.ingress, request)
        except health.UnknownService as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def Watch(self, request, context):
        async for resp in health.watch(self.ingress, request):
            yield resp


async def start_server(ingress: Ingress, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add_MedusaServicer_to_server(GrpcServicer(ingress), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(ingress), server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def start_http(ingress: Ingress, host: str = "127.0.0.1", port: int = 0):
    """The ingress's OpenAI-compatible face (services.openai_api) on a uvicorn server in this
    event loop, as Serve's HTTP proxy would call it. Returns (server, port)."""
    import socket

    import uvicorn
    from starlette.requests import Request

    from services.openai_api import OpenAIFace

    face = OpenAIFace(ingress)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        response = await face(Request(scope, receive))
        await response(scope, receive, send)

    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    server._medusa_task = task
    return server, sock.getsockname()[1]


__all__ = ["LocalHandle", "GrpcServicer", "HealthServicer", "start_server", "start_http"]
