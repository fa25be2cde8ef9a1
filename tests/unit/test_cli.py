"""`medusa generate`: the --json contract, and a clear one-line error with exit code 2 (never
a stack trace) for each kind of bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

from medusa.cli import main
from medusa.heads.io import save_heads, untrained_heads
from tests.conftest import MT_BENCH, tiny_model


def cli(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_contract(capsys):
    code, out, err = cli(capsys, "Name three colours.", "--json", "--max-new-tokens", "8", "--tree", "chain")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert set(row) == {"id", "prompt_token_ids", "token_ids", "text", "new_tokens", "steps", "mean_accepted", "seconds", "tokens_per_s"}
    assert 1 <= row["new_tokens"] == len(row["token_ids"]) <= 8
    assert row["steps"] >= 1 and row["mean_accepted"] >= 1.0 and row["tokens_per_s"] > 0


def test_prompt_file_mt_bench_and_modes_agree(capsys):
    rows = {}
    for mode in ("ar", "spec"):
        code, out, err = cli(capsys, "--prompt-file", str(MT_BENCH), "--limit", "2", "--json", "--max-new-tokens", "12", "--mode", mode)
        assert code == 0, err
        rows[mode] = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["id"] for r in rows["ar"]] == ["81", "82"]
    assert [r["token_ids"] for r in rows["ar"]] == [r["token_ids"] for r in rows["spec"]]
    assert all(r["mean_accepted"] == 1.0 for r in rows["ar"])


def test_streams_text_and_prints_stats(capsys):
    code, out, err = cli(capsys, "Say hello.", "--max-new-tokens", "6", "--mode", "ar")
    assert code == 0 and out.strip() and "tokens/step accepted" in err


def assert_user_error(result, needle):
    code, _, err = result
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model(capsys, tmp_path):
    assert_user_error(cli(capsys, "hi", "--model", str(tmp_path / "nope")), "does not exist")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert_user_error(cli(capsys, "hi", "--model", str(tmp_path)), "unsupported architecture 'gpt2'")


def test_not_a_model_file(capsys, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    assert_user_error(cli(capsys, "hi", "--model", str(f)), "neither an HF checkpoint directory nor a .gguf")
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"GGUF" + b"\1" * 60)
    assert_user_error(cli(capsys, "hi", "--model", str(g)), "not a readable GGUF")


def test_heads_for_another_model(capsys, tmp_path):
    save_heads(untrained_heads(tiny_model()), tmp_path)
    assert_user_error(cli(capsys, "hi", "--heads", str(tmp_path)), "trained for another base model")


def test_malformed_tree_json(capsys, tmp_path):
    f = tmp_path / "tree.json"
    f.write_text('{"paths": [[0], [0, 0, 0]]}')
    assert_user_error(cli(capsys, "hi", "--tree", str(f)), "has no parent")
    f.write_text("[[0], ")
    assert_user_error(cli(capsys, "hi", "--tree", str(f)), "malformed")


def test_prompt_too_long_for_context(capsys):
    assert_user_error(cli(capsys, "hi", "--max-new-tokens", "9000"), "exceeds the model's context of 8192")


@pytest.mark.parametrize("args,needle", [
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "-2"], "top-k"),
    (["--rule", "typical", "--temperature", "0"], "needs --temperature > 0"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
])
def test_invalid_sampling_values(capsys, args, needle):
    assert_user_error(cli(capsys, "hi", *args), needle)


def test_bad_prompt_file(capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "no prompt field"}\n')
    assert_user_error(cli(capsys, "--prompt-file", str(f)), "expected")
    assert_user_error(cli(capsys, "--prompt-file", str(tmp_path / "missing.jsonl")), "cannot read prompt file")


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--mode", "fast"])
    assert e.value.code == 2


def test_beam_search_json_returns_the_best_beams(capsys):
    code, out, err = cli(capsys, "Name three colours.", "--json", "--max-new-tokens", "6", "--beams", "3",
                         "--num-return", "3", "--length-penalty", "0.5", "--early-stopping", "never", "--tree", "chain")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert len(row["beams"]) == 3 and row["beams"][0]["token_ids"] == row["token_ids"]
    scores = [b["score"] for b in row["beams"]]
    assert scores == sorted(scores, reverse=True) and 1 <= row["new_tokens"] <= 6
    code, out, err = cli(capsys, "Name three colours.", "--json", "--max-new-tokens", "6", "--beams", "3",
                         "--num-return", "3", "--length-penalty", "0.5", "--early-stopping", "never", "--mode", "ar")
    assert code == 0, err
    plain = json.loads(out.strip().splitlines()[-1])["beams"]  # speculative == plain beam search (scores to rounding)
    assert [b["token_ids"] for b in plain] == [b["token_ids"] for b in row["beams"]]
    assert [b["score"] for b in plain] == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("args,needle", [
    (["--beams", "0"], "beams must be"),
    (["--beams", "2", "--rule", "sample", "--temperature", "0.7"], "beam search is greedy"),
    (["--beams", "2", "--num-return", "3"], "num_return"),
    (["--beams", "2", "--early-stopping", "maybe"], "early_stopping"),
    (["--num-return", "2"], "--num-return needs --beams"),
    (["--beams", "40"], "beams must be at most"),
])
def test_invalid_beam_values(capsys, args, needle):
    assert_user_error(cli(capsys, "hi", *args), needle)
