"""`medusa chat`: an interactive multi-turn chat in the terminal (or one turn per line of piped
stdin). Every turn goes through the batched engine's public API as one session
(Engine.submit(Request(..., session_id=...))), so the conversation's KV cache is kept between
turns and only the new part of the prompt is prefilled; a stats line per turn says how many
prompt tokens the session reused.

Commands at the prompt: /reset starts a new conversation, /exit (or Ctrl-D) ends.
Knows the terminal and the chat history; decoding is the engine's."""
from __future__ import annotations

import sys
import uuid

from medusa.commands.common import HelpFormatter, add_model_args
from medusa.errors import MedusaError, RequestError

SPECULATION = {"auto": "auto", "spec": "on", "ar": "off"}


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat that keeps the conversation's KV cache between turns",
                       formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--mode", choices=tuple(SPECULATION), default="auto",
                   help="auto: the engine chooses per step by measured cost; spec: always the draft heads; ar: plain")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; above 0 samples (lossless)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.set_defaults(func=run)


def _turns(interactive: bool):
    """User lines: from the terminal with a prompt, else one turn per non-empty stdin line."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        line = line.strip()
        if line:
            yield line


def run(args) -> int:
    from medusa.decoding.engine import Engine, Request
    from medusa.decoding.sampling import SamplingParams
    from medusa.runtime import load_stack

    if args.max_new_tokens < 1:
        raise RequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise RequestError(f"--temperature must be >= 0, got {args.temperature}")
    interactive = sys.stdin is not None and sys.stdin.isatty()
    heads = "none" if args.mode == "ar" else args.heads
    stack = load_stack(args.model, heads=heads, tree=args.tree, dtype=args.dtype, device=args.device, progress=interactive)
    tok = stack.tokenizer
    if not tok.has_chat_template:
        raise RequestError("this model's tokenizer has no chat template: use `medusa generate --no-chat`")
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(tok.eos_token_ids)))
    params = SamplingParams(temperature=args.temperature, rule="greedy" if args.temperature == 0 else "sample", seed=args.seed)
    engine = Engine(stack.model, stack.heads, stack.tree, max_batch=1)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history, session = list(opening), uuid.uuid4().hex
    if interactive:
        print(f"medusa chat ({stack.source.name}, heads: {stack.heads_name}): /reset starts over, /exit or Ctrl-D ends",
              file=sys.stderr)
    turn = 0
    for line in _turns(interactive):
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, session, turn = list(opening), uuid.uuid4().hex, 0
            print("(new conversation)", file=sys.stderr)
            continue
        turn += 1
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history)
        try:
            handle = engine.submit(Request(ids, max_new_tokens=args.max_new_tokens, sampling=params, stop_token_ids=eos,
                                           speculation=SPECULATION[args.mode], session_id=session))
            out, stats, stream = [], None, tok.stream()
            for ev in handle:  # no scheduler thread: iterating drives the engine
                out.extend(ev.tokens)
                sys.stdout.write(stream.push(ev.tokens))
                sys.stdout.flush()
                stats = ev.stats or stats
        except MedusaError as e:
            history.pop()
            print(f"\nmedusa chat: error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": tok.decode(out)})
        if stats is not None:
            rate = stats.new_tokens / stats.seconds if stats.seconds else 0.0
            print(f"[turn {turn}] {stats.new_tokens} new tokens, prompt {stats.prompt_tokens} tokens of which "
                  f"{stats.reused_tokens} reused from the session, {stats.steps} steps, {stats.mean_accepted:.2f} "
                  f"tokens/step, {rate:.1f} tokens/s (last tree: {stats.tree})", file=sys.stderr, flush=True)
    return 0
