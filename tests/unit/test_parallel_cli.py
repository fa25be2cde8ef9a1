"""`--tp N` on the command line (CPU: N gloo processes): `medusa generate --tp 3` prints the text
of one device, and bad settings end in one line with exit code 2 before any rank starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Give three tips for staying healthy."


def _generate(*extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "medusa.cli", "generate", PROMPT, "--device", "cpu",
                        "--max-new-tokens", "32", *extra], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.parametrize("mode", ["spec", "ar"])
def test_generate_tp3_prints_the_text_of_one_device(mode):
    """Rank 0 of 3 runs the command's own engine path (--mode spec: the shipped Hydra++ heads
    and their tree; ar: plain decoding) and streams the text; the other ranks replay."""
    one, three = _generate("--mode", mode), _generate("--mode", mode, "--tp", "3")
    assert three.stdout == one.stdout and one.stdout.strip()
    assert "32 new tokens" in three.stderr  # rank 0's stats line


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_tp_not_dividing_the_heads_is_one_line_exit_2(capsys):
    _one_line_error(capsys, main(["generate", "hi", "--device", "cpu", "--tp", "2"]),
                    "tensor parallel size 2 does not divide the model's 9 attention heads")
    _one_line_error(capsys, main(["generate", "hi", "--device", "cpu", "--tp", "0"]), "--tp must be >= 1")


def test_tp_with_one_named_gpu_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setattr("medusa.commands.common.check_device", lambda d: None)
    _one_line_error(capsys, main(["generate", "hi", "--device", "cuda:1", "--tp", "3"]), "--device cuda (or cpu)")


def test_more_ranks_than_gpus_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setattr("medusa.commands.common.check_device", lambda d: None)
    n = torch.cuda.device_count()
    _one_line_error(capsys, main(["generate", "hi", "--device", "cuda", "--tp", str(n + 3)]),
                    f"tensor parallel size {n + 3} needs {n + 3} GPUs; this machine has {n}")


def test_bench_tp_needs_the_engine_benchmark(capsys):
    _one_line_error(capsys, main(["bench", "--step-cost", "--tp", "3"]), "--tp runs with --concurrency")
