"""DESIGN.md's import rules: the core library imports only torch, numpy, safetensors, gguf and
the standard library; Ray, Redis and OpenTelemetry only under services/; grpc only in
medusa/proto, medusa/client and services/."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ["medusa/model", "medusa/heads", "medusa/decoding", "medusa/parallel", "medusa/training"]
CORE_ALLOWED = {"torch", "numpy", "safetensors", "gguf", "medusa"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def files(*folders):
    for f in folders:
        yield from (ROOT / f).rglob("*.py")


def test_core_imports_only_torch_numpy_safetensors_gguf_stdlib():
    bad = {}
    for f in files(*CORE):
        extra = {m for m in imports(f) if m not in CORE_ALLOWED and m not in sys.stdlib_module_names}
        if extra:
            bad[str(f.relative_to(ROOT))] = sorted(extra)
    assert not bad, bad


def test_ray_redis_otel_only_in_services_and_grpc_only_at_the_edge():
    grpc_ok = ("medusa/proto", "medusa/client", "services")
    bad = []
    for f in files("medusa", "services"):
        rel = str(f.relative_to(ROOT))
        mods = imports(f)
        if mods & {"ray", "redis", "opentelemetry"} and not rel.startswith("services"):
            bad.append(rel)
        if "grpc" in mods and not rel.startswith(grpc_ok):
            bad.append(rel)
    assert not bad, bad


def test_kernels_import_only_torch_and_triton():
    """medusa/kernels holds the optional Triton kernels; the core reaches them only through
    their torch-fallback wrappers (Triton is imported lazily, inside a function)."""
    bad = {}
    for f in files("medusa/kernels"):
        extra = {m for m in imports(f) if m not in {"torch", "triton", "medusa"} and m not in sys.stdlib_module_names}
        if extra:
            bad[str(f.relative_to(ROOT))] = sorted(extra)
        top_level = {n.names[0].name.split(".")[0] for n in ast.parse(f.read_text()).body if isinstance(n, ast.Import)}
        assert "triton" not in top_level, f"{f}: triton must be imported lazily"
    assert not bad, bad
