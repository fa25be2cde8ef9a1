"""The packaging claims: the client SDK imports with torch and ray absent (a subprocess whose
import system refuses them), the `client` extra and the base dependencies hold neither, the
protobuf / grpcio floors are what the generated code checks at import, ray is bounded above
(the alpha RequestRouter API), and the CLI without the engine says what to install."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""
HEAVY = ("torch", "ray", "numpy", "transformers", "redis", "opentelemetry", "safetensors")


def _run(code: str, blocked=HEAVY):
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=set(blocked)) + code], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_client_imports_without_torch_or_ray():
    r = _run("from medusa.client import MedusaClient, AsyncMedusaClient\n"
             "c = MedusaClient('127.0.0.1:1', api_key='k')\n"
             "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'numpy')]\n"
             "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1500:]
    r = _run("import torch", blocked=("torch",))  # the blocker itself works
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_client_extra_and_base_dependencies_are_small():
    proj = _project()
    names = lambda reqs: {Requirement(x).name for x in reqs}  # noqa: E731
    for reqs in (proj["dependencies"], proj["optional-dependencies"]["client"]):
        assert not names(reqs) & {"torch", "ray", "numpy", "transformers", "redis"}
    assert {"grpcio", "protobuf"} <= names(proj["optional-dependencies"]["client"])
    assert "torch" in names(proj["optional-dependencies"]["engine"])
    assert "medusa-serve" in names(proj["optional-dependencies"]["serve"])  # serve pulls in engine and client
    assert re.search(r'pip install -q -e "\.\[[^\]]*engine', (ROOT / "Makefile").read_text())


def test_floors_match_the_generated_code_and_ray_is_bounded():
    extras = _project()["optional-dependencies"]
    req = {Requirement(x).name: Requirement(x) for x in extras["client"] + extras["serve"] if not x.startswith("medusa-serve")}
    gen = (ROOT / "medusa/proto/v1/medusa_pb2.py").read_text()
    major, minor, patch = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", gen).groups()
    needed = Version(f"{major}.{minor}.{patch}")
    floor = min(Version(s.version) for s in req["protobuf"].specifier if s.operator == ">=")
    assert floor == needed
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (ROOT / "medusa/proto/v1/medusa_pb2_grpc.py").read_text()).group(1)
    assert min(Version(s.version) for s in req["grpcio"].specifier if s.operator == ">=") >= Version(grpc_gen)
    ray = req["ray"].specifier
    assert any(s.operator == "<" for s in ray) and Version("2.60.0") in ray


def test_cli_without_the_engine_says_what_to_install():
    r = _run("import runpy; sys.argv = ['medusa', 'generate', 'hi']; runpy.run_module('medusa.cli', run_name='__main__')")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "medusa-serve[engine]" in r.stderr


def test_floors_script_pins_each_requirement_at_its_floor(tmp_path):
    """scripts/floors.py (make test-floors) reads the pins from pyproject: every `>=` floor
    becomes `==`, markers kept; a requirement without a floor or an unknown extra is an error."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import floors
    finally:
        sys.path.pop(0)
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nname = "x"\n[project.optional-dependencies]\n'
                 'a = ["grpcio>=1.2.3", "protobuf >= 4.5, <9", "foo[bar]>=0.1; python_version < \'4\'"]\n'
                 'b = ["other[a]"]\n')
    assert floors.floors("a", p) == ["grpcio==1.2.3", "protobuf==4.5", "foo[bar]==0.1; python_version < '4'"]
    for extra, msg in (("b", "no '>=' floor"), ("c", "no extra 'c'")):
        try:
            floors.floors(extra, p)
        except ValueError as e:
            assert msg in str(e)
        else:
            raise AssertionError(f"{extra}: no error")
    pins = floors.floors("client")  # the real file: one pin per client requirement, at its floor
    client = [Requirement(x) for x in _project()["optional-dependencies"]["client"]]
    assert [Requirement(x).name for x in pins] == [r.name for r in client]
    for pin, r in zip(pins, client):
        floor = min(Version(s.version) for s in r.specifier if s.operator == ">=")
        assert Version(next(iter(Requirement(pin).specifier)).version) == floor
