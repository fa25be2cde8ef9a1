"""The batched speculative-decoding engine (see core.py for how one scheduler iteration runs
and which file holds what). Import the public names from here."""
from medusa.decoding.engine.core import DEFAULT_MAX_SEQ_LEN, Engine
from medusa.decoding.engine.requests import SPECULATION, Request, RequestHandle, RequestStats, TokenEvent, TokenLogprob
from medusa.decoding.sampling import SamplingParams
from medusa.decoding.tree import DEFAULT_TREE

__all__ = ["DEFAULT_MAX_SEQ_LEN", "DEFAULT_TREE", "SPECULATION", "Engine", "Request", "RequestHandle", "RequestStats",
           "SamplingParams", "TokenEvent", "TokenLogprob"]
