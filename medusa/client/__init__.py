"""Client SDK of the Medusa serving cluster (gRPC, medusa.v1).

    from medusa.client import MedusaClient
    with MedusaClient("localhost:9000", api_key="...") as c:
        r = c.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=64)
        print(r.text, r.usage, r.stats.mean_accepted)
        for d in c.stream("Once upon a time", max_new_tokens=32):
            print(d.text, end="")

Imports grpc and the generated messages, never torch."""
from medusa.client.aio import AsyncMedusaClient
from medusa.client.errors import (AuthenticationError, DeadlineExceededError, InvalidRequestError,
                                  MedusaClientError, QuotaExceededError, ServerError, UnavailableError)
from medusa.client.retry import RetryPolicy
from medusa.client.sync import MedusaClient
from medusa.client.types import BeamResult, Delta, GenerateResult, SpecStats, TokenLogprob, Usage

__all__ = ["MedusaClient", "AsyncMedusaClient", "RetryPolicy", "BeamResult", "Delta", "GenerateResult", "Usage", "SpecStats", "TokenLogprob",
           "MedusaClientError", "AuthenticationError", "QuotaExceededError", "InvalidRequestError",
           "DeadlineExceededError", "UnavailableError", "ServerError"]
