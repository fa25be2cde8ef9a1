"""Print an extra's requirements from pyproject.toml pinned at their floors (`name>=X` ->
`name==X`), one a line, for a lowest-versions install (`make test-floors`):

    python3 scripts/floors.py client     # grpcio==1.85.1 / protobuf==7.35.1

A requirement without a `>=` floor, or an extra that is not declared, is an error (exit 2):
the floors are read from pyproject, never copied by hand. Standard library only."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._\-]*(?:\[[^\]]*\])?)\s*>=\s*([^,;\s]+)\s*(?:,[^;]*)?(;.*)?$")


def floors(extra: str, pyproject: Path = PYPROJECT) -> list[str]:
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    if extra not in extras:
        raise ValueError(f"pyproject.toml declares no extra {extra!r} (it has: {', '.join(sorted(extras))})")
    pins = []
    for req in extras[extra]:
        m = FLOOR.match(req)
        if m is None:
            raise ValueError(f"{req!r} in [{extra}] has no '>=' floor to pin")
        name, version, marker = m.groups()
        pins.append(f"{name}=={version}{marker or ''}")
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: floors.py EXTRA", file=sys.stderr)
        return 2
    try:
        print("\n".join(floors(argv[0])))
    except ValueError as e:
        print(f"floors.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
