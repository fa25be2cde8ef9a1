"""Arguments, help formatting, device checks and prompt reading shared by subcommands."""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from medusa.errors import RequestError


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help only where X says something (not None, not a
    store_true's False) and the help does not already state its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or action.option_strings == [] or "%(default)" in text):
            return text
        return text + " (default: %(default)s)"


def compile_arg(flag: bool | None) -> str | None:
    """--compile (the default torch.compile mode, ""), --no-compile (None) or neither ("auto":
    where it was measured to pay, medusa.decoding.graphs.compile_choice) as a runner's compile_mode."""
    return "auto" if flag is None else ("" if flag else None)


DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str | None) -> None:
    """--device: cpu, cuda or cuda:N, and CUDA only where torch sees a GPU (one line, never a traceback)."""
    if device is None:
        return
    if not DEVICE_RE.match(device):
        raise RequestError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RequestError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RequestError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def add_model_args(p: argparse.ArgumentParser, heads: bool = True, tree: bool = True,
                   device_default: str = "cuda if available, else cpu") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="HF checkpoint directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    if heads:
        g.add_argument("--heads", default="default", help="default | medusa | hydra | none | PATH to a heads folder")
    if heads and tree:
        g.add_argument("--tree", help="tree name (ar, tree2, tree4, tree8, chain, tree16, tree32, tree64), a dynamic tree "
                                      "(dynamic64: chosen per step from the heads' confidences; dynamic64@0.02: prune paths "
                                      "under that probability) or JSON file (default: the heads' own); "
                                      "a +lookupN suffix adds a chain of N prompt-lookup nodes for greedy requests (alone, +lookup8: to the default tree)")
    g.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device", default=None, help=f"cpu | cuda | cuda:N (default: {device_default})")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """JSONL rows {"id", "prompt"} or MT-Bench rows {"question_id", "turns"} (first turn)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read prompt file {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(Prompt(str(row.get("id", n)), row["prompt"]))
        elif isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
            out.append(Prompt(str(row.get("question_id", n)), row["turns"][0]))
        else:
            raise RequestError(f'{path}:{n}: expected {{"id", "prompt"}} or {{"question_id", "turns"}}')
        if limit and len(out) >= limit:
            break
    if not out:
        raise RequestError(f"{path} holds no prompts")
    return out
