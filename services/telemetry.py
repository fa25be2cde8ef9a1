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


def finished_spans() -> list[dict]:
    """Spans kept by the `memory` exporter in this process, as plain dicts."""
    if _memory is None:
        return []
    return [span_dict(s) for s in _memory.get_finished_spans()]
