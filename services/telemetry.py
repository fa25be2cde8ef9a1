"""OpenTelemetry for the services: one tracer provider per process, its exporter chosen by
the standard variables (OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_*), or by
the serve setting `tracing` (which also accepts `memory`, kept in-process for tests), and W3C
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
            elif name == "memory":
                from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

                _memory = InMemorySpanExporter()
                provider.add_span_processor(SimpleSpanProcessor(_memory))
            else:
                raise ValueError(f"unknown trace exporter {name!r}: otlp, console, memory or none")
            trace.set_tracer_provider(provider)
            _configured = name
    return trace.get_tracer(f"medusa.services.{component}")


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
    out = []
    for s in _memory.get_finished_spans():
        out.append({"name": s.name, "trace_id": format(s.context.trace_id, "032x"),
                    "span_id": format(s.context.span_id, "016x"),
                    "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
                    "attributes": dict(s.attributes or {})})
    return out
