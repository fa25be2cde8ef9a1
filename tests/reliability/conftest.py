"""The reliability suite's profile: `short` (CI, `make test`: bounded to a few minutes on 2
cores) or `long` (`make reliability`), from MEDUSA_RELIABILITY; and the run's figures, written
as JSON to MEDUSA_RELIABILITY_REPORT when set (RELIABILITY.md quotes them)."""
import json
import os

import pytest

PROFILES = {
    #            load clients x seconds, fuzzed requests, cancelled streams, seconds of load around a Redis restart
    "short": dict(clients=4, seconds=10, fuzz=60, cancels=30, redis_load_s=6),
    "long": dict(clients=16, seconds=120, fuzz=600, cancels=100, redis_load_s=40),
}


@pytest.fixture(scope="session")
def profile():
    name = os.environ.get("MEDUSA_RELIABILITY", "short")
    if name not in PROFILES:
        raise pytest.UsageError(f"MEDUSA_RELIABILITY must be one of {', '.join(PROFILES)}, got {name!r}")
    return dict(PROFILES[name], name=name)


@pytest.fixture(scope="session")
def report():
    figures: dict = {}
    yield figures
    path = os.environ.get("MEDUSA_RELIABILITY_REPORT")
    if path and figures:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(figures, f, indent=2, sort_keys=True)
