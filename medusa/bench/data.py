"""Where benchmark prompt sets live: `mt_bench` is the 80 MT-Bench questions in the shared
data folder ($MEDUSA_DATA, else ../shared/data beside the project root); anything else is a
JSONL file path. Knows nothing of tokenisation."""
from __future__ import annotations

import os
from pathlib import Path

from medusa.bench.env import REPO_ROOT
from medusa.errors import RequestError

NAMED = {"mt_bench": Path("mt_bench") / "question.jsonl"}


def data_dirs() -> list[Path]:
    """$MEDUSA_DATA alone when set; else ../shared/data beside the project root or the cwd."""
    if os.environ.get("MEDUSA_DATA"):
        return [Path(os.environ["MEDUSA_DATA"])]
    return [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def resolve_dataset(name: str) -> tuple[str, Path]:
    """(dataset label for file names, JSONL path)."""
    if name in NAMED:
        for d in data_dirs():
            if (d / NAMED[name]).is_file():
                return name, d / NAMED[name]
        raise RequestError(f"dataset {name!r} not found: expected {NAMED[name]} under "
                           f"{' or '.join(str(d) for d in dict.fromkeys(data_dirs()))}; set MEDUSA_DATA to the data folder or pass a JSONL file")
    p = Path(name)
    if not p.is_file():
        raise RequestError(f"dataset {name!r} is neither {' nor '.join(NAMED)} nor a JSONL file")
    return p.stem, p
