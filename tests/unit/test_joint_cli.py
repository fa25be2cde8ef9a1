"""`medusa train --joint` and `medusa eval quality`: bad values are one-line errors (exit 2); one
joint step on the default model writes a Medusa-2 heads folder (adapters beside the heads, named
in heads.json) that loads merged, trains on (heads only or jointly) and is scored against the
original."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medusa.cli import main
from medusa.heads.adapters import ADAPTERS, MARK
from medusa.training.data import Record


def cli(capsys, *args):
    code = main(list(args))
    _, err = capsys.readouterr()
    return code, err


def one_line_error(code, err, needle):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (code, err)


TRAIN = ["train", "--data", "missing.jsonl", "--out", "nowhere"]


@pytest.mark.parametrize("flags,needle", [
    (["--joint", "--lora-rank", "0"], "rank must be >= 1"),
    (["--joint", "--lora-alpha", "-2"], "alpha must be a positive number"),
    (["--joint", "--lora-alpha", "nan"], "alpha must be a positive number"),
    (["--joint", "--lora-targets", "q_proj,wq"], "targets must be distinct names"),
    (["--joint", "--lora-targets", ""], "no LoRA targets"),
    (["--joint", "--adapter-lr", "0"], "learning rate must be positive"),
    (["--joint", "--heads-weight", "0"], "weight"),
    (["--joint", "--adapter-start", "-1"], "adapter_start"),
    (["--lora-rank", "8"], "only with --joint"),
    (["--kl-weight", "0.5"], "only with --joint"),
])
def test_bad_joint_flags_exit_2_with_one_line(capsys, flags, needle):
    one_line_error(*cli(capsys, *TRAIN, *flags), needle)


@pytest.mark.parametrize("flags,needle", [
    (["--prompt-file", "p.jsonl", "--new-tokens", "0"], "--new-tokens"),
    (["--prompt-file", "p.jsonl", "--limit", "0"], "--limit"),
    (["--prompt-file", "p.jsonl", "--min-identical", "1.5"], "the bar"),
    (["--prompt-file", "p.jsonl", "--max-ppl-ratio", "0.9"], "the bar"),
    (["--data", "d.jsonl", "--heldout", "0"], "--heldout"),
])
def test_bad_quality_flags_exit_2_with_one_line(capsys, flags, needle):
    one_line_error(*cli(capsys, "eval", "quality", *flags), needle)


def test_quality_needs_its_prompts(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "quality", "--heads", "medusa"])
    assert e.value.code == 2


def test_joint_training_writes_a_medusa2_model(tmp_path, capsys):
    from medusa.runtime import load_stack, shipped_heads_dir

    if shipped_heads_dir("medusa") is None:
        pytest.skip("no shipped Medusa heads")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(Record(f"r{i}", "greedy", [1, 2 + i, 3], [(7 * i + 11 * k) % 1000 + 5 for k in range(20)]).to_json() + "\n"
                            for i in range(6)))
    out = tmp_path / "m2"
    common = ["--data", str(data), "--max-steps", "1", "--batch-tokens", "256", "--max-len", "32", "--warmup", "1",
              "--heldout", "0", "--eval-batches", "1", "--dtype", "float32", "--device", "cpu"]
    code, err = cli(capsys, "train", *common, "--out", str(out), "--init-heads", "medusa", "--joint", "--lora-rank", "2",
                    "--lora-targets", "q_proj,v_proj", "--adapter-lr", "1e-3")
    assert code == 0, err
    assert "LoRA r2 on q_proj,v_proj" in err
    cfg = json.loads((out / "heads.json").read_text())
    entry = cfg["extra"]["adapters"]  # heads.json says the backbone was adapted, and how
    assert entry["rank"] == 2 and entry["alpha"] == 4.0 and entry["targets"] == ["q_proj", "v_proj"]
    assert entry["base_fingerprint"] == cfg["base_fingerprint"]
    tensors = load_file(str(out / ADAPTERS))
    assert len(tensors) == 30 * 2 * 2 and tensors["layers.0.self_attn.q_proj.lora_A"].shape == (2, 576)
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if k.endswith("lora_B"))  # the step moved them
    recipe = json.loads((out / "train.json").read_text())
    assert recipe["joint"]["lora"]["rank"] == 2 and recipe["joint"]["adapter_lr_scale"] == pytest.approx(1.0)

    # loading the heads merges the adapters into the backbone
    plain = load_stack(None, heads="none", dtype="float32", device="cpu", progress=False).model
    stack = load_stack(None, heads=str(out), dtype="float32", device="cpu", progress=False)
    assert getattr(stack.model, MARK)["digest"] == entry["digest"]
    q = stack.model.layers[0].self_attn.q_proj.weight
    delta = (tensors["layers.0.self_attn.q_proj.lora_B"] @ tensors["layers.0.self_attn.q_proj.lora_A"]) * 2.0
    torch.testing.assert_close(q - plain.layers[0].self_attn.q_proj.weight, delta, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(stack.model.layers[0].mlp.up_proj.weight, plain.layers[0].mlp.up_proj.weight)  # not a target

    # heads-only training on from a Medusa-2 folder keeps its adapters
    code, err = cli(capsys, "train", *common, "--out", str(tmp_path / "more"), "--init-heads", str(out))
    assert code == 0, err
    assert (tmp_path / "more" / ADAPTERS).read_bytes() == (out / ADAPTERS).read_bytes()
    assert json.loads((tmp_path / "more" / "heads.json").read_text())["extra"]["adapters"]["digest"] == entry["digest"]
    # joint training on from it takes the adapters' shape; another is a one-line error
    code, err = cli(capsys, "train", *common, "--out", str(tmp_path / "other"), "--init-heads", str(out), "--joint",
                    "--lora-rank", "4")
    one_line_error(code, err, "leave the LoRA flags out")

    # the quality command scores it against the original, states the bar and its verdict
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "Name a colour."}\n{"id": 2, "prompt": "Count to three."}\n')
    report = tmp_path / "q.json"
    code = main(["eval", "quality", "--heads", str(out), "--prompt-file", str(prompts), "--new-tokens", "6",
                 "--dtype", "float32", "--device", "cpu", "--json", str(report), "--min-identical", "0"])
    text = capsys.readouterr().out
    got = json.loads(report.read_text())
    assert code == (0 if got["kept"] else 1)
    assert "identical greedy outputs" in text and "perplexity of the original's outputs" in text
    assert got["prompts"] == 2 and got["new_tokens"] == 6 and got["mean_kl"] >= 0 and got["ppl_original"] > 1


def test_a_variant_that_does_not_ship_is_a_one_line_error(capsys, tmp_path):
    from medusa.runtime import shipped_heads_dir

    if shipped_heads_dir("medusa2") is not None:
        pytest.skip("medusa2 ships in this installation")
    code, err = cli(capsys, "eval", "quality", "--heads", "medusa2", "--prompt-file", str(tmp_path / "p.jsonl"),
                    "--dtype", "float32", "--device", "cpu")
    assert code == 2 and "no shipped medusa2 heads" in err and "Traceback" not in err
