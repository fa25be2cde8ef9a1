"""`medusa generate|chat|distill|train|eval|tree|vocab|bench|serve`.

Errors caused by the user's input (MedusaError) print one line and exit with code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from medusa.errors import MedusaError

# subcommand modules under medusa.commands; a missing one is skipped (added by later issues)
COMMANDS = ("generate", "chat", "distill", "train", "eval", "tree", "vocab", "bench", "serve")


def quiet_progress_bars() -> None:
    """When stderr is not a terminal (a log file, CI), tqdm bars would write a line per refresh:
    turn them off through tqdm's own TQDM_* defaults, unless the user set those."""
    import os

    if not sys.stderr.isatty() and not any(k.startswith("TQDM_") for k in os.environ):
        os.environ["TQDM_DISABLE"] = "1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medusa", description="Speculative decoding with Medusa / Hydra draft heads.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"medusa.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"medusa.commands.{name}":
                continue
            raise
        mod.register(sub)
    return p


# what the subcommands need beyond the client SDK (`pip install medusa-serve[engine]`)
ENGINE_MODULES = ("torch", "numpy", "safetensors", "gguf", "tqdm", "transformers", "tokenizers", "jinja2")


def main(argv: list[str] | None = None) -> int:
    quiet_progress_bars()  # before any import of tqdm: it reads its TQDM_* defaults at import
    try:
        parser = build_parser()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ENGINE_MODULES:
            raise
        print(f"medusa: {e.name} is not installed: the CLI needs the engine (pip install 'medusa-serve[engine]')",
              file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            from medusa.commands.common import check_device

            check_device(args.device)
        return int(args.func(args) or 0)
    except MedusaError as e:
        print(f"medusa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
