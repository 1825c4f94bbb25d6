"""``sparse-runtime generate DIR --engine ENGINE --prompt TEXT``: stream greedy text from a model."""
from __future__ import annotations

import sys
import time

from . import Command


def add_arguments(p):
    p.add_argument("model", help="checkpoint directory, export directory, or a model spec (smollm2-135m, tiny-llama)")
    from ..runtime import engine_names

    p.add_argument("--engine", default="torch-cpu",
                   help=f"one of {', '.join(engine_names())} (default torch-cpu); sparse-cpu = the lean path on our "
                        "sparse kernels, the fastest decode on a CPU (docs/runtime.md)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate after the prompt (default 48)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: min(2, cores))")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--prefill-length", type=int, default=128,
                   help="deepsparse only: the static prompt length it compiles (prompts are left-padded)")
    from ._dtype import add_act_dtype_argument, add_dtype_argument, add_kv_dtype_argument, add_prefill_dtype_argument

    add_dtype_argument(p)
    add_prefill_dtype_argument(p)
    add_act_dtype_argument(p)
    add_kv_dtype_argument(p)


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and hasattr(tokenizer, "apply_chat_template") and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    try:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    except TypeError:
        return list(tokenizer.encode(prompt))


def run(args) -> int:
    from ..models import ByteTokenizer
    from ..runtime import load_engine

    from ..errors import ConfigError
    from ..models.loading import model_context_limit

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: ask for at least 1 new token")
    if not args.prompt and not args.chat:  # before loading anything (every engine would fail on it)
        raise ConfigError("the prompt is empty: give --prompt some text")
    from ._dtype import engine_dtype_options

    opts = {"prefill_length": args.prefill_length} if args.engine == "deepsparse" else {}
    opts.update(engine_dtype_options(args.engine, getattr(args, "dtype", None),  # before loading anything
                                     getattr(args, "prefill_dtype", None), act_dtype=getattr(args, "act_dtype", None),
                                     kv_dtype=getattr(args, "kv_dtype", None)))
    eng = load_engine(args.engine, args.model, threads=args.threads, **opts)
    try:
        tok = eng.tokenizer or ByteTokenizer()
        ids = encode(tok, args.prompt, args.chat)
        limit = model_context_limit(args.model) or getattr(
            getattr(getattr(eng, "model", None), "config", None), "max_position_embeddings", None)
        if limit and len(ids) + args.max_new_tokens > limit:  # past it the positions are garbage
            raise ConfigError(f"the prompt is {len(ids)} tokens and --max-new-tokens {args.max_new_tokens} more, but "
                              f"the model's context is {limit} tokens; shorten the prompt or lower --max-new-tokens")
        if args.engine == "deepsparse":
            from ..runtime.deepsparse_engine import LICENCE

            print(f"[{LICENCE}]", file=sys.stderr)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        out: list[int] = []
        shown = ""
        t0 = time.perf_counter()
        first = None
        for t in eng.generate(ids, args.max_new_tokens, eos_token_id=getattr(tok, "eos_token_id", None)):
            first = first or time.perf_counter() - t0
            out.append(t)
            text = tok.decode(out, skip_special_tokens=True)
            sys.stdout.write(text[len(shown):])  # stream only what is new (multi-token characters)
            sys.stdout.flush()
            shown = text
        dt = time.perf_counter() - t0
        print()
        n = len(out)
        rate = (n - 1) / (dt - first) if n > 1 and dt > first else float("nan")
        print(f"[{eng.name}: {len(ids)} prompt tokens, {n} new tokens, first token {first or 0:.2f} s, "
              f"{rate:.1f} tokens/s after it; {eng.evidence().get('sparse_path')}]", file=sys.stderr)
    finally:
        eng.close()
    return 0


COMMAND = Command("generate", "stream greedy text from a (sparse) model on the chosen engine", add_arguments, run)
