"""The CLI as a new user meets it (issue 27): bad --device values, no prompt on an empty stdin,
`medusa bench`'s default output folder, --help hygiene, `medusa chat` keeping the session's KV
between turns, distill naming the broken line of a JSONL file, and tqdm bars that stay out of
logs when stderr is not a terminal."""
import argparse
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_is_one_line_exit_2(capsys, device):
    _one_line_error(capsys, main(["generate", "hi", "--device", device]), "--device must be cpu, cuda or cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_line_exit_2(capsys):
    _one_line_error(capsys, main(["generate", "hi", "--device", "cuda"]), "no CUDA GPU")
    _one_line_error(capsys, main(["bench", "--step-cost", "--device", "cuda:1"]), "no CUDA GPU")


@pytest.mark.parametrize("stdin", ["", "  \n\n"])
def test_no_prompt_and_an_empty_stdin_is_refused(capsys, monkeypatch, stdin):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    _one_line_error(capsys, main(["generate"]), "no prompt")
    _one_line_error(capsys, main(["generate", "  "]), "the prompt is empty")


def test_empty_stdin_from_dev_null_in_a_real_process():
    r = subprocess.run([sys.executable, "-m", "medusa.cli", "generate"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "no prompt" in r.stderr and r.stdout == ""


def test_bench_writes_into_the_current_directory_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["bench"])
    assert args.out == "bench-results"
    code = main(["bench", "--step-cost", "--shape", "tiny", "--contexts", "16", "--queries", "1", "--budget", "0.01",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    written = sorted((tmp_path / "bench-results").glob("step-cost-tiny-*"))
    assert code == 0 and written, err
    assert all(str(p) in err for p in written if p.suffix in (".json", ".md"))  # absolute paths, printed


def _options(parser, name="medusa"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for n, sp in a.choices.items():
                yield from _options(sp, f"{name} {n}")
        elif a.option_strings and a.dest != "help":
            yield name, parser, a


def test_help_is_complete_and_says_defaults_once():
    seen = set()
    for name, parser, a in _options(build_parser()):
        assert a.help, f"{name} {a.option_strings[0]} has no help"
        text = parser.formatter_class(prog=name)._get_help_string(a) % {"default": a.default}
        assert text.count("(default:") <= 1 and "(default: None)" not in text, f"{name} {a.option_strings[0]}: {text}"
        seen.add((name, a.option_strings[0]))
    assert ("medusa chat", "--mode") in seen and ("medusa serve", "--http-port") in seen
    assert ("medusa eval heads", "--tree") not in seen  # offered only where it does something
    shown = subprocess.run([sys.executable, "-m", "medusa.cli", "generate", "--help"], capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120).stdout
    assert "--max-new-tokens" in shown and "(default: None)" not in shown and "(default: False)" not in shown


def test_chat_keeps_the_sessions_kv_between_turns(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n\nName a colour.\n/exit\nnever read\n"))
    assert main(["chat", "--mode", "ar", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    turns = [line for line in out.err.splitlines() if line.startswith("[turn ")]
    assert len(turns) == 2, out.err
    reused = [int(t.split(" of which ")[1].split()[0]) for t in turns]
    assert reused[0] == 0 and reused[1] > 0  # the second turn's prompt starts with the first turn's KV
    assert len(out.out.strip().splitlines()) >= 2


def test_distill_names_the_broken_line(tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "b"}\n{"id": 3, "prompt": \n{"id": 4, "prompt": "d"}\n')
    _one_line_error(capsys, main(["distill", "--prompts", str(f), "--out", str(tmp_path / "o.jsonl")]), f"{f}:4:")
    f.write_text('{"id": 1, "prompt": "a"}\n\n\n{"id": 2, "nothing": "b"}\n')
    _one_line_error(capsys, main(["distill", "--prompts", str(f), "--out", str(tmp_path / "o.jsonl")]), f"{f}:4:")


BAR = "from tqdm import tqdm\nfor _ in tqdm(range(300), mininterval=0, miniters=1): pass\n"


@pytest.mark.parametrize("env, quiet", [({}, True), ({"TQDM_MININTERVAL": "0"}, False)])
def test_progress_bars_stay_out_of_logs(env, quiet):
    """stderr is a pipe here (as in a log): the CLI turns bars off unless the user set TQDM_* variables."""
    code = "from medusa.cli import quiet_progress_bars\nquiet_progress_bars()\n" + BAR
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env})
    assert r.returncode == 0, r.stderr
    assert (r.stderr == "") == quiet, r.stderr[:200]
    plain = subprocess.run([sys.executable, "-c", BAR], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert len(plain.stderr.splitlines()) > 100  # without it, a log gets a line per refresh



def test_serve_takes_the_http_port_from_the_config(tmp_path):
    pytest.importorskip("ray")
    from services.launch import read_http_port

    assert read_http_port(ROOT / "deploy" / "serve_config.yaml") == 8000
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("http_options: {port: 8123}\napplications: []\n")
    assert read_http_port(cfg) == 8123
    cfg.write_text("applications: []\n")
    assert read_http_port(cfg) is None
