"""Where benchmark prompt sets live: `mt_bench` is the 80 MT-Bench questions shipped with the
package (medusa/bench/datasets/, with their license); anything else is a JSONL file path.
Knows nothing of tokenisation."""
from __future__ import annotations

from pathlib import Path

from medusa.errors import RequestError

DATASETS = Path(__file__).resolve().parent / "datasets"
NAMED = {"mt_bench": DATASETS / "mt_bench" / "question.jsonl"}


def resolve_dataset(name: str) -> tuple[str, Path]:
    """(dataset label for file names, JSONL path)."""
    if name in NAMED:
        if not NAMED[name].is_file():  # only a broken install lacks it
            raise RequestError(f"dataset {name!r} is missing from the package (expected {NAMED[name]}); reinstall medusa-serve")
        return name, NAMED[name]
    p = Path(name)
    if not p.is_file():
        raise RequestError(f"dataset {name!r} is neither {' nor '.join(NAMED)} nor a JSONL file")
    return p.stem, p
