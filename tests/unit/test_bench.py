"""`medusa bench`: the decode benchmark end to end on the default model (small), the step-cost
mode on the tiny shape, and the pure pieces (mode parsing, summaries, percentiles, memory
refusal, dataset lookup)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import medusa
from medusa.bench import concurrency as cc
from medusa.bench import step_cost as sc
from medusa.bench.data import resolve_dataset
from medusa.bench.decode import Mode, ModeSpec, Run, parse_modes
from medusa.bench.report import decode_markdown, prompt_record, summarise
from medusa.cli import main
from medusa.commands.common import read_prompts
from medusa.decoding.tree import load_tree
from medusa.errors import RequestError

PROMPTS = [{"id": "sea", "prompt": "Write a haiku about the sea."}, {"id": "sum", "prompt": "What is 2 + 2?"}]


@pytest.fixture(scope="session")
def decode_run(tmp_path_factory):
    """One small `medusa bench` decode run (ar + medusa), shared by the checks below."""
    d = tmp_path_factory.mktemp("bench")
    data = d / "two.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    rc = main(["bench", "--dataset", str(data), "--limit", "2", "--modes", "ar,medusa", "--max-new-tokens", "16",
               "--tree", "chain", "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--out", str(d / "out")])
    return rc, d / "out"


def test_decode_bench_writes_every_field(decode_run):
    rc, out = decode_run
    assert rc == 0
    doc = json.loads((out / "two-cpu-{}core.json".format(doc_cores(out))).read_text())
    for key in ("device", "date", "commit", "dtype", "torch", "tree", "tree_nodes", "heads", "model",
                "max_new_tokens", "num_prompts", "modes", "prompts", "graphs", "skipped"):
        assert key in doc, key
    assert doc["dtype"] == "float32" and doc["num_prompts"] == 2 and doc["max_new_tokens"] == 16
    assert list(doc["modes"]) == ["ar", "medusa"]
    ar, spec = doc["modes"]["ar"], doc["modes"]["medusa"]
    assert ar["speedup_vs_ar"] == 1.0 and ar["speedup_vs_hf"] is None
    assert spec["matches_ar_all"] is True  # the golden check: speculative greedy == plain greedy
    assert spec["tree_nodes"] == doc["tree_nodes"] > 1
    for s in (ar, spec):
        assert s["tokens_per_s_median"] > 0 and s["ttft_s_median"] > 0 and s["mean_accepted"] >= 1.0
    for p in doc["prompts"]:
        assert p["modes"]["medusa"]["matches_ar"] is True and p["modes"]["ar"]["matches_ar"] is None
        assert 1 <= p["modes"]["ar"]["new_tokens"] <= 16
        assert sum(p["modes"]["ar"]["accepted_hist"].values()) == p["modes"]["ar"]["steps"]
    md = (out / f"two-cpu-{doc_cores(out)}core.md").read_text()
    assert "| medusa |" in md and doc["commit"][:10] in md
    assert (out / f"two-cpu-{doc_cores(out)}core.png").stat().st_size > 1000


def doc_cores(out) -> str:
    (name,) = [p.name for p in out.glob("two-cpu-*core.json")]
    return name.removeprefix("two-cpu-").removesuffix("core.json")


def test_decode_bench_beams_compares_plain_speculative_and_hf_beam_search(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(PROMPTS[1]) + "\n")
    rc = main(["bench", "--dataset", str(data), "--modes", "hf,ar,medusa", "--max-new-tokens", "6", "--beams", "2",
               "--tree", "chain", "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--out", str(tmp_path / "out"),
               "--name", "beams"])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "beams.json").read_text())
    assert doc["beams"] == 2 and "num_beams=2" in doc["modes"]["hf"]["note"]
    assert doc["modes"]["medusa"]["matches_ar_all"] is True  # speculative beam search == plain beam search
    (p,) = doc["prompts"]
    assert p["modes"]["hf"]["matches_ar"] is True  # and both == HF generate(num_beams=2)
    assert doc["modes"]["medusa"]["mean_accepted"] >= 1.0 and doc["modes"]["ar"]["tokens_per_s_median"] > 0
    assert "beam search with 2 beams" in (tmp_path / "out" / "beams.md").read_text()


def test_step_cost_tiny_shape(tmp_path):
    rc = main(["bench", "--step-cost", "--shape", "tiny", "--contexts", "32,100", "--queries", "1,4,16",
               "--budget", "0.05", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("step-cost-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["shape"] == "tiny" and doc["graphs"] is False and doc["floor_s"] > 0 and doc["copy_rate_gbs"] > 0
    assert {(r["context"], r["queries"]) for r in doc["rows"]} == {(c, q) for c in (32, 100) for q in (1, 4, 16)}
    for r in doc["rows"]:
        assert r["batch"] == 1 and r["graphs"] is False and r["seconds_median"] > 0 and r["repeats"] >= 5
    assert all(r["x_one_token"] == 1.0 for r in doc["rows"] if r["queries"] == 1)
    table = cc.step_cost_table(doc, context=40)
    assert set(table) == {(1, 1), (1, 4), (1, 16)}
    assert path.with_suffix(".md").read_text().count("| off |") == 2


def test_bad_input_is_a_one_line_error(capsys, tmp_path):
    assert main(["bench", "--modes", "ar,beam", "--dataset", "nope.jsonl"]) == 2
    assert "unknown mode 'beam'" in capsys.readouterr().err
    assert main(["bench", "--step-cost", "--shape", "gpt-9", "--out", str(tmp_path)]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert main(["bench", "--step-cost", "--shape", "tiny", "--queries", "1,x"]) == 2
    assert "comma list of integers" in capsys.readouterr().err
    assert main(["bench", "--through", "grpc", "--step-cost"]) == 2
    assert "choose one of --step-cost, --concurrency and --through" in capsys.readouterr().err
    assert main(["bench", "--through", "grpc", "--max-new-tokens", "0", "--out", str(tmp_path)]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def test_parse_modes():
    specs = parse_modes("hf,ar,medusa,medusa:tree32,hydra")
    assert [(s.kind, s.heads, s.tree) for s in specs] == [
        ("hf", None, None), ("ar", None, None), ("spec", "medusa", None), ("spec", "medusa", "tree32"), ("spec", "hydra", None)]
    for bad in ("ar,ar", "ar:chain", "", "gpt"):
        with pytest.raises(RequestError):
            parse_modes(bad)


def _run(tokens, tps, steps):
    return Run(tokens, len(tokens) / tps, 0.1, len(steps), steps, "length")


def test_summary_speedups_are_ratios_of_medians_and_golden_check_catches_a_mismatch():
    ar_tree = load_tree("ar")
    modes = [Mode(ModeSpec("hf", "hf"), None), Mode(ModeSpec("ar", "ar"), None, tree=ar_tree),
             Mode(ModeSpec("medusa", "spec", "medusa"), None, "medusa", load_tree("tree16"))]
    results = [
        {"hf": _run([1, 2, 3, 4], 2.0, [1] * 3), "ar": _run([1, 2, 3, 4], 4.0, [1] * 3), "medusa": _run([1, 2, 3, 4], 8.0, [2, 1])},
        {"hf": _run([5, 6], 2.0, [1]), "ar": _run([5, 6], 6.0, [1]), "medusa": _run([5, 7], 9.0, [1])},
        {"hf": _run([8], 4.0, []), "ar": _run([8], 8.0, []), "medusa": _run([8], 10.0, [])},
    ]
    s = summarise(modes, results)
    assert s["ar"]["tokens_per_s_median"] == pytest.approx(6.0)
    assert s["medusa"]["speedup_vs_ar"] == pytest.approx(9.0 / 6.0, abs=1e-3)
    assert s["medusa"]["speedup_vs_hf"] == pytest.approx(4.5, abs=1e-3)
    assert s["medusa"]["mean_accepted"] == pytest.approx(4 / 3, abs=1e-3)
    assert s["medusa"]["accepted_hist"] == {"1": 2, "2": 1}
    assert s["medusa"]["matches_ar_all"] is False and s["medusa"]["matches_ar_count"] == 2
    assert s["hf"]["matches_ar_count"] == 3
    rec = prompt_record("q", 10, results[1], "ar")
    assert rec["modes"]["medusa"]["matches_ar"] is False and rec["modes"]["hf"]["matches_ar"] is True
    doc = {"dataset": "d", "device": "cpu-2core", "date": "now", "commit": "abc", "model": "m", "dtype": "float32",
           "num_prompts": 3, "max_new_tokens": 4, "warmup": 1, "modes": s, "skipped": {"hydra": "not shipped"}}
    md = decode_markdown(doc)
    assert "| medusa | medusa | tree16 (16) |" in md and "2/3" in md and "skipped: not shipped" in md


def test_step_cost_refuses_what_does_not_fit(monkeypatch):
    cfg = sc.SHAPES["llama-7b"]
    monkeypatch.setattr(sc, "free_memory", lambda dev: 20 * 10**9)
    dt, note = sc.pick_dtype(cfg, None, torch.device("cpu"), 2240)  # 27 GB in float32: falls back to bfloat16
    assert dt == torch.bfloat16 and "do not fit" in note
    with pytest.raises(RequestError, match="bfloat16"):
        sc.pick_dtype(cfg, torch.float32, torch.device("cpu"), 2240)
    monkeypatch.setattr(sc, "free_memory", lambda dev: 8 * 10**9)
    with pytest.raises(RequestError, match="GB"):
        sc.pick_dtype(cfg, None, torch.device("cpu"), 2240)
    assert sc.SHAPES["llama3-8b"].num_params == pytest.approx(8.03e9, rel=0.01)
    assert sc.SHAPES["llama-7b"].num_params == pytest.approx(6.74e9, rel=0.01)
    assert sc.query_tree(64).num_nodes == 64 and sc.query_tree(1).num_nodes == 1


def test_percentile_and_dataset_lookup(tmp_path):
    assert cc.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and cc.percentile([1.0, 2.0], 99) == 2.0
    assert cc.percentile([], 50) is None
    label, path = resolve_dataset("mt_bench")  # shipped with the package, found from any cwd
    assert label == "mt_bench" and path.is_relative_to(Path(medusa.__file__).parent)
    prompts = read_prompts(path)
    assert len(prompts) == 80 and [prompts[0].id, prompts[-1].id] == ["81", "160"]
    own = tmp_path / "mine.jsonl"
    own.write_text('{"question_id": 7, "turns": ["Hi"]}\n')
    assert resolve_dataset(str(own)) == ("mine", own)
    with pytest.raises(RequestError, match="neither"):
        resolve_dataset(str(tmp_path / "missing.jsonl"))


def test_concurrency_repeats_alternate_warm_engines_and_ratio_run_by_run():
    """--repeats: every mode's engine is timed `repeats` times at each level, and `vs ar` is the
    median of the ratios to the ar run of the same round (not a ratio of medians)."""
    import statistics

    from medusa.decoding.tree import build_tree, chain
    from medusa.heads.io import untrained_heads
    from tests.conftest import tiny_model

    model = tiny_model(seed=5, vocab=16)
    heads = untrained_heads(model, num_heads=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 3]]
    rows = cc.run_concurrency(model, heads, build_tree(chain(2), "chain2"), prompts, [1, 2], ["ar", "spec"],
                              max_new_tokens=5, eos=(), requests=3, repeats=3)
    assert [(r["mode"], r["concurrency"]) for r in rows] == [("ar", 1), ("ar", 2), ("spec", 1), ("spec", 2)]
    ar = {r["concurrency"]: r for r in rows if r["mode"] == "ar"}
    for r in rows:
        assert r["repeats"] == 3 and len(r["tokens_per_s_runs"]) == 3
        assert r["tokens_per_s"] == statistics.median(r["tokens_per_s_runs"])
        assert r["requests"] == 3 and r["new_tokens"] == 15  # each timed run: every request to its length
        assert r["engine_steps"] > 0 and sum(r["steps_by_tree"].values()) == r["engine_steps"]
        ratios = [s / a for s, a in zip(r["tokens_per_s_runs"], ar[r["concurrency"]]["tokens_per_s_runs"])]
        assert r["speedup_vs_ar_runs"] == [round(x, 3) for x in ratios]
        assert r["speedup_vs_ar"] == round(statistics.median(ratios), 3)
    assert all(r["speedup_vs_ar"] == 1.0 for r in ar.values())
    assert set(rows[2]["steps_by_tree"]) == {"chain2"}  # speculation on: every timed step used the tree
    with pytest.raises(RequestError, match="--repeats"):
        cc.run_concurrency(model, heads, None, prompts, [1], ["ar"], 5, (), repeats=0)


def test_through_grpc_levels_pair_the_paths():
    """services.bench_grpc's levels with stand-in paths (no Ray): at concurrency 1 the medians, at
    C > 1 the rounds' aggregate tokens/s, requests cycled up to C, token mismatches counted."""
    import time as _time

    from services.bench_grpc import _level

    def path(tokens_per_s, ttft_s, flip=None):
        def run(prompt, n):
            _time.sleep(n / tokens_per_s)
            toks = [len(prompt)] * n
            if flip and prompt == flip:
                toks[-1] += 1
            return {"ttft_s": ttft_s, "seconds": n / tokens_per_s, "tokens": n, "engine_ttft_s": ttft_s / 2}, toks
        return run

    one = _level(path(1000, 0.01), path(500, 0.03), ["a", "bb"], 10, 1)
    assert one["engine"]["requests"] == one["grpc"]["requests"] == 2
    assert one["tokens_per_s_ratio"] == 0.5 and one["ttft_overhead_ms"] == 20.0 and one["ttft_overhead_ms_paired"] == 15.0
    assert one["same_tokens"] and "tokens_per_s_total" not in one["grpc"]
    four = _level(path(1000, 0.01), path(1000, 0.01, flip="bb"), ["a", "bb"], 20, 4)
    assert four["grpc"]["requests"] == 4 and four["grpc"]["tokens"] == 80
    assert four["engine"]["tokens_per_s_total"] > 1000  # four clients at once beat one request's rate
    assert not four["same_tokens"] and four["requests_with_other_tokens"] == 2


def test_through_grpc_flags(capsys, monkeypatch):
    assert main(["bench", "--serve-config", "deploy/serve_config.yaml"]) == 2
    assert "go with --through grpc" in capsys.readouterr().err
    monkeypatch.delenv("MEDUSA_API_KEY", raising=False)
    assert main(["bench", "--through", "grpc", "--target", "127.0.0.1:9", "--limit", "1"]) == 2
    assert "MEDUSA_API_KEY" in capsys.readouterr().err
