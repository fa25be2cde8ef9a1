"""`medusa bench` on a GPU: step-cost rows with and without CUDA graphs (tiny shape), and the
decode benchmark with graphed steps keeps the golden check (spec output == ar output)."""
import json

import pytest

from medusa.cli import main

pytestmark = pytest.mark.gpu


def test_step_cost_measures_graphs(tmp_path):
    rc = main(["bench", "--step-cost", "--shape", "tiny", "--contexts", "64", "--queries", "1,16",
               "--budget", "0.05", "--device", "cuda", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("step-cost-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["graphs"] is True and doc["dtype"] == "bfloat16"
    assert {(r["queries"], r["graphs"]) for r in doc["rows"]} == {(1, False), (16, False), (1, True), (16, True)}
    assert all(r["seconds_median"] > 0 for r in doc["rows"])


def test_decode_bench_with_graphs_matches_ar(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "prompt": "Write a haiku about the sea."}\n{"id": "b", "prompt": "Name three primes."}\n')
    rc = main(["bench", "--dataset", str(data), "--modes", "ar,medusa", "--max-new-tokens", "32", "--device", "cuda",
               "--dtype", "float32", "--out", str(tmp_path / "out")])
    assert rc == 0
    (path,) = (tmp_path / "out").glob("p-*.json")
    doc = json.loads(path.read_text())
    assert doc["graphs"] is True and doc["modes"]["medusa"]["matches_ar_all"] is True
