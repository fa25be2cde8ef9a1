"""Beam search: the engine's beams equal HF transformers' generate(num_beams=K) on the same
weights (tokens and sequences_scores, every early-stopping mode, several length penalties, EOS
mid-sequence), speculative beam search equals plain beam search, and bad beam requests are
clear errors."""
from __future__ import annotations

import random

import pytest
import torch

from medusa.decoding.beam import BeamParams, BeamSearch, Path, advance, check_params, place
from medusa.decoding.engine import Engine, Request
from medusa.decoding.engine.beams import BeamMember
from medusa.decoding.sampling import SamplingParams
from medusa.errors import RequestError
from medusa.model.loading import load_model

from test_engine import TREES, random_heads

transformers = pytest.importorskip("transformers")

EOS = 5
VOCAB = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random Llama written by transformers and loaded into medusa (peaky enough that EOS
    comes up mid-sequence, flat enough that beams diverge)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=1,
                                   pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("beam-llama")
    hf.save_pretrained(str(path))
    ours, _ = load_model(path, dtype=torch.float32, device="cpu")
    return hf, ours


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, VOCAB) for _ in range(rng.randint(3, 10))] for _ in range(n)]


def hf_beams(hf, ids, n, K, lp, es):
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, num_beams=K, num_return_sequences=K,
                          length_penalty=lp, early_stopping=es, return_dict_in_generate=True, output_scores=True)
    seqs = []
    for s in ref.sequences[:, len(ids):].tolist():  # HF fills after EOS with EOS (pad id 0 is falsy there)
        end = s.index(EOS) + 1 if EOS in s else len(s)
        seqs.append(s[:end])
    return seqs, ref.sequences_scores.tolist()


def run(engine, ids, n, K, lp=1.0, es=False, speculation="auto"):
    evs = list(engine.submit(Request(ids, max_new_tokens=n, beams=K, length_penalty=lp, early_stopping=es,
                                     num_return=K, speculation=speculation)))
    last = evs[-1]
    assert [t for e in evs for t in e.tokens] == list(last.beams[0].tokens)  # the best beam is the output
    return [list(h.tokens) for h in last.beams], [h.score for h in last.beams], last


MODES = [(1.0, False), (0.0, "never"), (2.0, True), (-1.0, False), (2.0, "never"), (0.5, True)]


@pytest.mark.parametrize("K", [2, 4])
def test_beams_equal_hf_generate(models, K):
    hf, ours = models
    engine = Engine(ours, None, max_batch=8, max_seq_len=128)
    eos_mid = 0
    for ids in prompts(6):
        for lp, es in MODES:
            want, want_scores = hf_beams(hf, ids, 12, K, lp, es)
            got, scores, last = run(engine, ids, 12, K, lp, es)
            assert got == want, (ids, lp, es)
            assert scores == pytest.approx(want_scores, rel=1e-5, abs=1e-5)
            assert last.finish_reason == ("eos" if got[0][-1] == EOS else "length")
            eos_mid += any(g[-1] == EOS and len(g) < 12 for g in got)
    assert eos_mid  # some beam ended on EOS before max_new_tokens: the finished-hypothesis path ran
    assert engine.stats()["running"] == 0 and engine.stats()["kv_rows_free"] == engine.pool.rows  # rows came back


def test_one_beam_is_greedy_as_hf(models):
    hf, ours = models
    engine = Engine(ours, None, max_batch=4, max_seq_len=128)
    for ids in prompts(3, seed=1):
        with torch.inference_mode():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, num_beams=1)[0, len(ids):].tolist()
        got, _ = engine.submit(Request(ids, max_new_tokens=10, beams=1)).result()
        assert got == want[:len(got)] and all(t == EOS for t in want[len(got):])


@pytest.mark.parametrize("head_type", ["medusa", "hydra++"])
def test_speculative_beams_equal_plain_beams(models, head_type):
    _, ours = models
    engine = Engine(ours, random_heads(ours, head_type), tree=TREES["tree"], max_batch=8, max_seq_len=128)
    for ids in prompts(5, seed=2):
        for K, (lp, es) in [(2, MODES[0]), (4, MODES[1]), (4, MODES[2])]:
            got, scores, last = run(engine, ids, 16, K, lp, es, speculation="on")
            want, want_scores, plain = run(engine, ids, 16, K, lp, es, speculation="off")
            assert got == want
            assert scores == pytest.approx(want_scores, rel=1e-5, abs=1e-5)
            assert plain.stats.tree == "ar" and plain.stats.mean_accepted in (0.0, 1.0)
            assert last.stats.tree != "ar"


def _peaky(seed: int) -> tuple[list[int], list[float]]:
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(VOCAB, generator=g) * 3, -1)
    v, i = lp.topk(16)
    return i.tolist(), v.tolist()


def test_advance_runs_several_exact_beam_steps_per_verification():
    """Synthetic verified paths: advance() makes the same choices as beam steps one by one, and
    goes on past the first step exactly while every new beam is its parent's greedy child."""
    p = BeamParams(beams=2, length_penalty=1.0, early_stopping="never")

    def dist(beam_tokens: tuple) -> tuple[list[int], list[float]]:  # a deterministic "model"
        return _peaky(hash(beam_tokens) % 10_000)

    def greedy_path(prefix: tuple, depth: int) -> Path:
        toks, ids, lps, cur = [], [], [], prefix
        for _ in range(depth + 1):
            i, v = dist(cur)
            ids.append(i)
            lps.append(v)
            toks.append(i[0])
            cur = cur + (i[0],)
        return Path(toks, ids, lps)

    plain = BeamSearch(p, 12, frozenset({EOS}))
    spec = BeamSearch(p, 12, frozenset({EOS}))
    beams = [()]
    multi = 0
    while not spec.done:
        new, S = advance(spec, [greedy_path(b, 3) for b in beams])
        multi += S > 1
        for _ in range(S):  # the same beam steps one at a time
            plain.step([dist(b.tokens) for b in plain.running])
        assert [b.tokens for b in plain.running] == [b.tokens for b in spec.running]
        assert plain.finished == spec.finished and plain.done == spec.done
        beams = [b.tokens for b in spec.running]
    assert spec.results() and multi  # some verification step ran more than one beam step


def test_place_keeps_first_children_in_place():
    rows, copies = place([3, 3, 1, 3], [0, 1, 2, 3])
    assert rows == [3, 0, 1, 2] and copies == [(0, 3), (2, 3)]
    assert not {d for d, _ in copies} & {s for _, s in copies}


@pytest.mark.parametrize("kw, msg", [
    (dict(beams=2, sampling=SamplingParams(temperature=0.7, rule="sample")), "temperature"),
    (dict(beams=9), "at most 8"),
    (dict(beams=0), "beams must be"),
    (dict(beams=2, num_return=3), "num_return"),
    (dict(beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(beams=2, length_penalty=float("nan")), "length_penalty"),
    (dict(beams=2, stop_sequences=((3,),)), "stop sequences"),
    (dict(beams=2, logprobs=1), "logprobs"),
    (dict(beams=2, session_id="s"), "sessions"),
])
def test_bad_beam_requests_are_clear_errors(models, kw, msg):
    engine = Engine(models[1], None, max_batch=16, max_seq_len=64)
    with pytest.raises(RequestError, match=msg):
        engine.submit(Request([7, 8, 9], max_new_tokens=4, **kw))


def test_beams_beyond_max_batch_are_an_error(models):
    engine = Engine(models[1], None, max_batch=2, max_seq_len=64)
    with pytest.raises(RequestError, match="max_batch"):
        engine.submit(Request([7, 8, 9], max_new_tokens=4, beams=4))


@pytest.mark.parametrize("heads", [None, "medusa"])
def test_beam_rows_share_steps_with_plain_requests_and_move_with_swaps(models, heads):
    """A beam request decodes in the same steps as plain requests; a plain row finishing before
    it moves one of its rows (the release's swap); every output equals the request run alone."""
    _, ours = models
    h = random_heads(ours, heads) if heads else None
    engine = Engine(ours, h, tree=TREES["tree"] if h else None, max_batch=6, max_seq_len=128)
    a, b, c = prompts(3, seed=3)
    short = engine.submit(Request(a, max_new_tokens=2, stop_token_ids=())).result()[0]
    long_ = engine.submit(Request(c, max_new_tokens=14, stop_token_ids=())).result()[0]
    beam_alone = run(engine, b, 12, 3, 0.5, "never")
    first = engine.submit(Request(a, max_new_tokens=2, stop_token_ids=()))  # row 0, done after one step
    beam = engine.submit(Request(b, max_new_tokens=12, beams=3, num_return=3, length_penalty=0.5, early_stopping="never"))
    later = engine.submit(Request(c, max_new_tokens=14, stop_token_ids=()))
    engine.step()  # admitted (plain rows first: 0 first, 1 later, 2-4 beam) and one step: `first` ends
    assert first.result()[0] == short and engine.stats()["running"] == 4
    assert isinstance(engine._rows[0], BeamMember)  # its release swapped the last beam row into row 0
    last = list(beam)[-1]
    assert [list(x.tokens) for x in last.beams] == beam_alone[0]
    assert [x.score for x in last.beams] == pytest.approx(beam_alone[1], rel=1e-5, abs=1e-5)
    assert later.result()[0] == long_
    assert engine.stats()["kv_rows_used"] == 0


def test_cancelling_a_beam_request_frees_its_rows(models):
    _, ours = models
    engine = Engine(ours, None, max_batch=4, max_seq_len=128)
    h = engine.submit(Request(prompts(1, seed=4)[0], max_new_tokens=30, beams=3))
    engine.step()  # admitted and prefilled
    engine.step()
    assert engine.stats()["kv_rows_used"] == 3
    h.cancel()
    evs = list(h)
    assert evs[-1].finish_reason == "cancelled" and evs[-1].beams == () and engine.stats()["kv_rows_used"] == 0


def test_a_beam_request_waits_for_k_free_rows_in_order(models):
    _, ours = models
    engine = Engine(ours, None, max_batch=3, max_seq_len=128)
    p1, p2, p3 = prompts(3, seed=5)
    x = engine.submit(Request(p1, max_new_tokens=6, stop_token_ids=()))
    y = engine.submit(Request(p2, max_new_tokens=6, beams=3))
    z = engine.submit(Request(p3, max_new_tokens=2, stop_token_ids=()))
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 2  # y needs 3 rows; z waits behind it
    assert x.result()[1].new_tokens == 6
    assert list(y)[-1].beams and z.result()[1].new_tokens == 2


def test_check_params_bounds_beams_by_stop_ids():
    check_params(BeamParams(beams=5), n_eos=2, max_top=16)  # 3 * 5 <= 16
    with pytest.raises(RequestError, match="at most 5"):
        check_params(BeamParams(beams=6), n_eos=2, max_top=16)
