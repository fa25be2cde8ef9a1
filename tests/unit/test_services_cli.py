"""`medusa serve` without starting anything: flags and --config become the app's settings,
MEDUSA_API_KEYS are hashed before they leave the process, bad input exits with code 2."""
from pathlib import Path

import pytest

pytest.importorskip("ray")

from medusa.cli import build_parser, main  # noqa: E402
from medusa.commands.serve import settings_from_args  # noqa: E402
from services.config import Settings  # noqa: E402
from services.launch import read_config, with_keys  # noqa: E402
from services.tenancy import hash_key  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_serve_the_default_model_on_cpu():
    args, port = settings_from_args(parse())
    assert port == 9000 and args["device"] == "cpu" and args["heads"] == "default"
    Settings.parse(args)


def test_config_file_with_flag_overrides():
    args, port = settings_from_args(parse("--config", str(REPO / "deploy" / "serve_config.yaml"), "--grpc-port", "9555",
                                          "--replicas", "2", "--max-batch", "4"))
    assert port == 9555 and args["engine_replicas"] == 2 and args["max_batch"] == 4
    assert "autoscaling" not in args  # a fixed replica count replaces the config's autoscaling
    assert Settings.parse(args).default_limits.max_concurrent == 16


def test_keys_are_hashed_and_a_dev_key_made_when_none_is_configured():
    args, dev = with_keys({}, "acme:k1,zeta:k2")
    assert not dev and {k["tenant"] for k in args["api_keys"]} == {"acme", "zeta"}
    assert "k1" not in repr(args) and {"tenant": "acme", "key_sha256": hash_key("k1")} in args["api_keys"]
    args, dev = with_keys({}, "")
    assert list(dev) == ["dev"] and args["api_keys"] == [{"tenant": "dev", "key_sha256": hash_key(dev["dev"])}]
    assert with_keys({"require_auth": False}, "")[1] == {}


def test_bad_config_exits_with_code_2(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read serve config" in capsys.readouterr().err
    (tmp_path / "other.yaml").write_text("applications:\n  - name: x\n    import_path: other:app\n")
    with pytest.raises(Exception, match="services.app:build_app"):
        read_config(tmp_path / "other.yaml")
    assert main(["serve", "--grpc-port", "70000"]) == 2


def test_ctrl_c_and_sigterm_drain_before_stopping(monkeypatch, capsys):
    """Issue 26: Ctrl-C / SIGTERM used to stop Serve at once (streams cut); now the ingress
    drains first (--drain-grace becomes the drain_grace_s setting), then the cluster stops."""
    import signal

    from medusa.commands import serve as serve_cmd
    from services import launch

    calls = []

    class FakeCluster:
        settings = {"redis_url": "redis://127.0.0.1:1/0"}
        redis = None
        dev_keys = {}
        target = "127.0.0.1:9"
        base_url = "http://127.0.0.1:8/v1"

        def drain(self):
            calls.append("drain")
            return {"in_flight": 2, "finished": 2, "cancelled": 0}

        def stop(self):
            calls.append("stop")

    started = {}

    def fake_start(app_args, **kw):
        started.update(app_args)
        return FakeCluster()

    def interrupted(_):
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # as if SIGTERM arrived

    monkeypatch.setattr(launch, "start", fake_start)
    monkeypatch.setattr(serve_cmd.time, "sleep", interrupted)
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["serve", "--drain-grace", "7"]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    assert calls == ["drain", "stop"] and started["drain_grace_s"] == 7.0
    assert "2 stream(s) finished" in capsys.readouterr().err
