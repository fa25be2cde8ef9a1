"""The committed medusa/proto code is exactly what protos/ generates."""
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from medusa.proto import build  # noqa: E402


def test_generated_code_matches_protos(tmp_path):
    written = build.build(tmp_path / "v1")
    assert {p.name for p in written} == set(build.GENERATED)
    committed = build.PACKAGE_DIR / "v1"
    stale = [p.name for p in written if p.read_text() != (committed / p.name).read_text()]
    assert not stale, f"medusa/proto is out of date with protos/ ({stale}): run `make proto`"


def test_generated_imports_live_under_medusa_proto():
    from medusa.proto.v1 import medusa_pb2, medusa_pb2_grpc

    assert medusa_pb2.DESCRIPTOR.package == "medusa.v1"
    assert hasattr(medusa_pb2_grpc, "add_MedusaServicer_to_server")
    src = Path(medusa_pb2_grpc.__file__).read_text()
    assert "from medusa.proto.v1 import medusa_pb2" in src and "from medusa.v1 import" not in src


def test_service_has_the_four_methods():
    from medusa.proto.v1 import medusa_pb2

    svc = medusa_pb2.DESCRIPTOR.services_by_name["Medusa"]
    methods = {m.name: m for m in svc.methods}
    assert set(methods) == {"Generate", "Tokenize", "ListModels", "Health"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not any(methods[n].server_streaming for n in ("Tokenize", "ListModels", "Health"))


def test_messages_pickle_under_their_package():
    """Ray Serve pickles request messages between processes: the class module must import."""
    import pickle

    from medusa.proto.v1 import medusa_pb2

    msg = medusa_pb2.GenerateRequest(prompt="hi", max_new_tokens=3)
    assert type(msg).__module__ == "medusa.proto.v1.medusa_pb2"
    assert pickle.loads(pickle.dumps(msg)) == msg
