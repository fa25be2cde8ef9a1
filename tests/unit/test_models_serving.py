"""Serving real models: the serve settings for model / dtype / quantization / heads / memory
fraction, and the KV pool a replica sizes from the device memory (services.engine_replica.
engine_sizes with a stated device: the engine built from it holds the rows planned, and the
replica reports them)."""
import pytest

pytest.importorskip("ray")

from medusa.cli import build_parser, main  # noqa: E402
from medusa.commands.serve import settings_from_args  # noqa: E402
from medusa.model.memory import GiB  # noqa: E402
from services.config import ConfigError, Settings  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402


def test_new_settings_parse_and_bad_values_are_refused():
    s = Settings.parse({"model": "/m", "dtype": "bfloat16", "quantization": "fp8", "heads": "/h", "device": "cuda",
                        "gpu_memory_utilization": 0.9})
    assert (s.quantization, s.gpu_memory_utilization, s.max_batch, s.batch_limit) == ("fp8", 0.9, None, 64)
    assert Settings.parse({}).batch_limit == 8 and Settings.parse({"max_batch": 3}).batch_limit == 3
    for bad in ({"quantization": "awq"}, {"gpu_memory_utilization": 1.5, "device": "cuda"},
                {"gpu_memory_utilization": 0.9}, {"max_batch": 0}, {"gpu_memory_utilization": True, "device": "cuda"}):
        with pytest.raises(ConfigError):
            Settings.parse(bad)


def test_serve_flags_reach_the_settings(capsys):
    args, _ = settings_from_args(build_parser().parse_args(
        ["serve", "--device", "cuda", "--quantization", "fp8", "--gpu-memory-utilization", "0.85", "--model", "/m"]))
    assert args["quantization"] == "fp8" and args["gpu_memory_utilization"] == 0.85 and args["model"] == "/m"
    assert main(["serve", "--gpu-memory-utilization", "0.85"]) == 2  # on the CPU default device
    assert "device: cuda" in capsys.readouterr().err


def test_engine_sized_from_memory_holds_the_planned_rows():
    from medusa.decoding.engine import Engine
    from services.engine_replica import EngineReplica, engine_sizes

    model = tiny_model(seed=0, vocab=32)
    cfg = model.cfg
    s = Settings.parse({"device": "cuda", "gpu_memory_utilization": 0.5, "max_seq_len": 64})
    # a stated device: 8 GiB, 1 GiB in use, 0.5 of it allowed -> 3 GiB for the step reserve and KV
    total, free = 8 * GiB, 7 * GiB
    sizes, plan = engine_sizes(s, model, None, None, mem_get_info=lambda: (free, total))
    row_tokens = 64 + 64 + 1
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # float32 cache
    assert plan["row_bytes"] == per_token * row_tokens
    assert plan["rows"] == plan["budget_bytes"] // plan["row_bytes"] and plan["budget_bytes"] > 0
    assert sizes == {"max_batch": min(plan["rows"], 64), "kv_budget_tokens": plan["rows"] * 64, "max_seq_len": 64}
    small = Settings.parse({"device": "cuda", "gpu_memory_utilization": 0.5, "max_seq_len": 64, "max_batch": 2})
    sizes, plan = engine_sizes(small, model, None, None, mem_get_info=lambda: (free, total))
    engine = Engine(model, None, "ar", **{**sizes, "kv_budget_tokens": 5 * 64})  # the pool a 5-row budget gives
    assert engine.stats()["kv_rows"] == 5 and sizes["max_batch"] == 2
    replica = EngineReplica(engine, replica_id="r", kv_plan=plan)
    assert replica.stats()["kv_plan"]["max_batch"] == 2 and replica.stats()["kv_plan"]["gpu_memory_utilization"] == 0.5
    plain, none = engine_sizes(Settings.parse({}), model, None, None)
    assert none is None and plain == {"max_batch": 8, "max_seq_len": None}
