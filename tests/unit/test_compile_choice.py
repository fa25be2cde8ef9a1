"""Where the step graphs run torch.compiled per-layer pieces by default (graphs.compile_choice)
and how the CLI's --compile / --no-compile map onto it."""
import importlib.util

import pytest

from medusa.commands.common import compile_arg
from medusa.decoding.graphs import AUTO, compile_choice


@pytest.fixture
def with_triton(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    monkeypatch.delenv("MEDUSA_COMPILE", raising=False)


def test_auto_compiles_graphed_one_row_steps_only(with_triton, monkeypatch):
    assert compile_choice(AUTO, capture=True, max_batch=1) == ""  # the default torch.compile mode
    assert compile_choice(AUTO, capture=False, max_batch=1) is None  # eager steps: nothing to compile for
    assert compile_choice(AUTO, capture=True, max_batch=16) is None  # batched engine: as written unless asked
    monkeypatch.setenv("MEDUSA_COMPILE", "0")
    assert compile_choice(AUTO, capture=True, max_batch=1) is None


def test_auto_needs_triton(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert compile_choice(AUTO, capture=True, max_batch=1) is None


def test_explicit_modes_are_kept(with_triton):
    assert compile_choice("", capture=True, max_batch=64) == ""
    assert compile_choice("max-autotune-no-cudagraphs", capture=True, max_batch=1) == "max-autotune-no-cudagraphs"
    assert compile_choice(None, capture=True, max_batch=1) is None


def test_cli_flag_maps_to_the_runner_mode():
    from medusa.cli import build_parser

    p = build_parser()
    for cmd in (["generate", "hi"], ["bench"]):
        assert compile_arg(p.parse_args(cmd).compile) == AUTO
        assert compile_arg(p.parse_args([*cmd, "--compile"]).compile) == ""
        assert compile_arg(p.parse_args([*cmd, "--no-compile"]).compile) is None
