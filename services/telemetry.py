"""OpenTelemetry for the services: one tracer provider per process, its exporter chosen by
the standard variables (OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_*), or by
the serve setting `tracing` (which also accepts `memory`, kept in-process for tests, and
`file:PATH`, JSON lines appended by every process, to read one trace across replicas), and W3C
trace-context carriers (plain dicts) that travel inside deployment calls so one request is one
trace across ingress, router, tokenizer and engine.

Knows nothing of what the spans measure."""
from __future__ import annotations

import os
import threading

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_lock = threading.Lock()
_configured: str | None = None
_memory = None  # InMemorySpanExporter when exporter == "memory"


def exporter_name(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("OTEL_TRACES_EXPORTER")
    if env:
        return env.split(",")[0].strip()
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return "none"


def setup(component: str, exporter: str | None = None) -> trace.Tracer:
    """The tracer of one component; installs this process's provider on first call."""
    global _configured, _memory
    name = exporter_name(exporter)
    with _lock:
        if _configured is None and name != "none":
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

            provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "medusa")}))
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            elif name == "console":
                provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            elif name.startswith("file:"):
                provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(name[5:])))
            elif name == "memory":
                from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

                _memory = InMemorySpanExporter()
                provider.add_span_processor(SimpleSpanProcessor(_memory))
            else:
                raise ValueError(f"unknown trace exporter {name!r}: otlp, console, memory or none")
            trace.set_tracer_provider(provider)
            _configured = name
        elif name == "memory" and _memory is None and _configured is not None:
            # a process whose provider an earlier exporter installed (OTel allows one per
            # process) still gets the in-memory exporter asked for, beside that one
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            provider = trace.get_tracer_provider()
            if hasattr(provider, "add_span_processor"):
                _memory = InMemorySpanExporter()
                provider.add_span_processor(SimpleSpanProcessor(_memory))
    return trace.get_tracer(f"medusa.services.{component}")


def span_dict(s) -> dict:
    return {"name": s.name, "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
            "attributes": dict(s.attributes or {}), "pid": os.getpid()}


class JsonLinesExporter:
    """A SpanExporter appending one JSON object per span to a file (one write per span, so
    processes sharing the file do not interleave lines)."""

    def __init__(self, path: str):
        self.path = path

    def export(self, spans):
        import json

        from opentelemetry.sdk.trace.export import SpanExportResult

        data = "".join(json.dumps(span_dict(s), default=str) + "\n" for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30000):
        return True


def read_spans(path: str) -> list[dict]:
    import json

    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def inject() -> dict[str, str]:
    """The current trace context as a carrier dict (to pass along with a deployment call)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: dict | None) -> otel_context.Context:
    return propagate.extract(carrier or {})


def client_parent(grpc_context):
    """Trace context sent by the client (traceparent metadata), if any."""
    if grpc_context is None:
        return None
    md = {k: v for k, v in grpc_context.invocation_metadata() or () if k in ("traceparent", "tracestate")}
    return extract(md) if md else None


def finished_spans() -> list[dict]:
    """Spans kept by the `memory` exporter in this process, as plain dicts."""
    if _memory is None:
        return []
    return [span_dict(s) for s in _memory.get_finished_spans()]


# ----- semantic conventions: server spans (rpc.* / http.*) and GenAI attributes (gen_ai.*)

GRPC_SERVICE = "medusa.v1.Medusa"


def server_attributes(grpc_context, method: str) -> dict:
    """Attributes of the SERVER span for one call: the HTTP face's context carries its own
    (`http_attributes`: http.request.method, http.route, url.path, ...), gRPC calls get rpc.*."""
    http = getattr(grpc_context, "http_attributes", None)
    if http:
        return dict(http)
    return {"rpc.system": "grpc", "rpc.service": GRPC_SERVICE, "rpc.method": method}


def server_span(tracer: trace.Tracer, name: str, grpc_context, method: str, parent=None):
    """A span of kind SERVER, as the OpenTelemetry RPC and HTTP conventions want for the span
    that receives a request."""
    return tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                        attributes=server_attributes(grpc_context, method))


def genai_request(span, *, operation: str, model: str, max_tokens: int, sampling: dict) -> None:
    """gen_ai.* request attributes where the GenAI conventions define them."""
    span.set_attribute("gen_ai.operation.name", operation)
    span.set_attribute("gen_ai.provider.name", "medusa")
    if model:
        span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("gen_ai.request.max_tokens", int(max_tokens))
    for key, attr in (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                      ("top_k", "gen_ai.request.top_k"), ("seed", "gen_ai.request.seed")):
        if sampling.get(key) is not None:
            span.set_attribute(attr, sampling[key])


def genai_response(span, *, response_id: str, model: str, finish_reason: str, input_tokens: int, output_tokens: int) -> None:
    span.set_attribute("gen_ai.response.id", response_id)
    if model:
        span.set_attribute("gen_ai.response.model", model)
    span.set_attribute("gen_ai.response.finish_reasons", (finish_reason,))
    span.set_attribute("gen_ai.usage.input_tokens", int(input_tokens))
    span.set_attribute("gen_ai.usage.output_tokens", int(output_tokens))
