"""Run the services in one process without Ray: LocalHandle mimics a Serve deployment handle
(`h.method.remote(...)` awaitable, `h.options(stream=True).method.remote(...)` async iterator)
over a plain object, and GrpcServicer exposes an Ingress on a grpc.aio server. Used by the
unit tests and handy for debugging the request path.

Knows nothing of what the wrapped objects do."""
from __future__ import annotations

import inspect

import grpc

from medusa.proto.v1 import medusa_pb2_grpc as pb_grpc
from services.grpc_wire import add_MedusaServicer_to_server
from services.ingress import Ingress, ServiceAbort


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


class _Context:
    """The part of a grpc context the Ingress uses (like Ray Serve's RayServegRPCContext)."""

    def __init__(self, ctx: grpc.aio.ServicerContext):
        self._ctx = ctx
        self.code = None
        self.details = ""
        self.trailing: list = []

    def invocation_metadata(self):
        return self._ctx.invocation_metadata()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailing = list(md)

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


async def start_server(ingress: Ingress, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add_MedusaServicer_to_server(GrpcServicer(ingress), server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


__all__ = ["LocalHandle", "GrpcServicer", "start_server"]
