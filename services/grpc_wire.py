"""Registers the medusa.v1.Medusa servicer on a gRPC server (Serve's gRPC proxy or a plain
grpc.aio server) with request deserializers that never fail: a body that is too large or does
not parse (corrupt bytes, invalid UTF-8 in a string field) becomes a `Malformed` value that the
ingress answers with INVALID_ARGUMENT and one line, instead of gRPC's UNKNOWN with a Python
class name. The serve config's grpc_servicer_functions names `add_MedusaServicer_to_server`.

Knows the generated medusa.v1 messages; nothing of what the servicer does."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from medusa.proto.v1 import medusa_pb2 as pb

SERVICE = "medusa.v1.Medusa"
# Nothing larger is even parsed (the ingress applies the configured, smaller limit).
HARD_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Malformed:
    """A request body that could not become its message (picklable: it travels to the ingress)."""

    reason: str


def tolerant(cls):
    def deserialize(data: bytes):
        if len(data) > HARD_MAX_BYTES:
            return Malformed(f"the request is {len(data)} bytes; this server accepts at most {HARD_MAX_BYTES}")
        try:
            return cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, or a RuntimeWarning on bad UTF-8 in some builds
            return Malformed(f"the request body is not a valid {cls.DESCRIPTOR.full_name} "
                             "(corrupt protobuf or a string field that is not UTF-8)")
    return deserialize


METHODS = {  # name -> (handler kind, request type, response type)
    "Generate": (grpc.unary_stream_rpc_method_handler, pb.GenerateRequest, pb.GenerateResponse),
    "Tokenize": (grpc.unary_unary_rpc_method_handler, pb.TokenizeRequest, pb.TokenizeResponse),
    "ListModels": (grpc.unary_unary_rpc_method_handler, pb.ListModelsRequest, pb.ListModelsResponse),
    "Health": (grpc.unary_unary_rpc_method_handler, pb.HealthRequest, pb.HealthResponse),
}


def add_MedusaServicer_to_server(servicer, server) -> None:  # noqa: N802 - the generated function's name
    handlers = {name: kind(getattr(servicer, name), request_deserializer=tolerant(req),
                           response_serializer=resp.SerializeToString)
                for name, (kind, req, resp) in METHODS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
