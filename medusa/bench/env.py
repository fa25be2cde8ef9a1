"""Where and on what a benchmark ran: a short device label for file names, the git commit,
library versions and the date. Knows nothing of models or modes."""
from __future__ import annotations

import datetime as _dt
import os
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def device_label(device: torch.device) -> str:
    """`cpu-2core` or the CUDA device name as a slug (`nvidia-h100-80gb-hbm3`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return f"{device.type}-{cores}core"


def device_detail(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch CUDA {torch.version.cuda}"
    return f"{device_label(device)}, {torch.get_num_threads()} torch threads"


def git_commit() -> dict:
    """{"commit": sha or "unknown", "dirty": bool | None} of the checkout the code runs from."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "medusa"))
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def environment(device: torch.device) -> dict:
    """Fields every result file carries."""
    env = {
        "device": device_label(device),
        "device_detail": device_detail(device),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        **git_commit(),
        "torch": torch.__version__,
        "load_average": load_average(),  # other work on the machine skews CPU timings
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
