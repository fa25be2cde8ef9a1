"""What the runs of `medusa bench` share: option checks (comma lists, minimums, the device)
and the result files (a slug for their names; JSON + markdown written under --out, the
markdown printed)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from medusa.errors import RequestError


def int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RequestError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise RequestError(f"{flag} takes positive integers, got {text!r}")
    return vals


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "custom"


def device_of(args):
    import torch

    try:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise RequestError(f"unknown device {args.device!r}: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("--device cuda but no CUDA device is available")
    return dev


def load_average_now():
    from medusa.bench.env import load_average

    return load_average()


def at_least(flag: str, value: int | None, least: int) -> None:
    """One clear line for a numeric option below its minimum (None: not given, fine)."""
    if value is not None and value < least:
        raise RequestError(f"{flag} must be >= {least}, got {value}")


def publish(doc: dict, out: Path, stem: str, markdown) -> int:
    """Stamp the end load, write `stem`.json and .md under `out`, print the markdown; exit 0."""
    doc["load_average_end"] = load_average_now()
    md = markdown(doc)
    paths = write_files(out, stem, doc, md)
    print(md)
    print("wrote " + ", ".join(str(p.resolve()) for p in paths), file=sys.stderr)
    return 0


def write_files(out: Path, stem: str, doc: dict, markdown: str) -> list[Path]:
    from medusa.bench.report import write_json

    paths = [write_json(doc, out / f"{stem}.json")]
    (out / f"{stem}.md").write_text(markdown)
    paths.append(out / f"{stem}.md")
    return paths
