"""Serving under load: SmolLM2-135M dense vs Wanda 70 % vs 2:4 behind ``sparse-runtime serve``.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_serve.py --out-dir benchmarks/results
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_serve.py --soak 600 --out-dir benchmarks/results
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_serve.py --steps --out-dir benchmarks/results
    # AMX CPUs: prompts and batched steps in bf16 (every server with the same flags); the step alone
    # with both batch dtypes in the same rounds
    python benchmarks/bench_serve.py --prefill-dtype bfloat16 --batch-dtype bfloat16 --name serve_bf16_batch
    python benchmarks/bench_serve.py --steps --steps-batch-dtypes float32,bfloat16 --name serve_batch
    python benchmarks/bench_serve.py --smoke          # tiny models, < 1 minute: proves the script works

Load test (default): one server process per model, all on the same build and engine (``sparse-cpu``:
the dense checkpoint has no linear sparse enough to pack, so it runs the same lean path with dense
kernels), started together and measured in interleaved rounds (per level, per round, each model in
turn) so drift on the machine hits all alike. Levels: fixed concurrency 1, 4 and 16 (closed loop:
each of N clients sends its next request when the last one ends) and open-loop Poisson arrivals at
``--rate`` requests/s. Prompts: the Alpaca set (``sparse_runtime.data.alpaca_records``, the Alpaca
template), the same sequence for every model; outputs of exactly ``--output-tokens`` tokens
(greedy, ``ignore_eos``). Streamed (SSE) so each token's arrival is seen. Reported per model and
level: time to first token p50/p99, inter-token latency p50/p99 (every gap between two tokens of a
request), output tokens/s and requests/s (over the level's wall time), failed requests, and the
server's peak resident memory (VmHWM). Beside concurrency 1: ``generate``'s ms/token (the engine's
own greedy loop in this process, same prompts and lengths) and the ratio of the server's median ITL
to it. Checkpoints are those of ``bench_latency.py`` (``$SPARSE_RUNTIME_CACHE/bench-latency``; pruned
here when missing).

Soak (``--soak SECONDS``): one server (``--soak-model``, default wanda-70), 16 clients for that
long, 5 % of requests malformed (cycling through bad JSON, unknown model, n=2, a prompt longer
than the context, max_tokens beyond it, an unknown option). A valid request fails if it gets an
error or ends without a normal finish_reason; a malformed one must get its 4xx. The server's RSS
is sampled every 5 s; growth = last-minute mean over the value at the end of warm-up (the first
``--soak-warmup`` seconds). Pass: no failed valid request, every malformed one refused, growth < 5 %.

Results go to ``--out-dir`` (default ``$SPARSE_RUNTIME_CACHE/bench-serve``, outside the repository;
pass ``--out-dir benchmarks/results`` for a run to keep) as ``<name>.md`` and ``.json`` via
``sparse_runtime.report.save_results`` (machine, CPU/ISA and versions included).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BAD_KINDS = ("json", "model", "n", "prompt_len", "max_tokens", "option")


# -- servers ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``sparse-runtime serve`` in a subprocess on a loopback port."""

    def __init__(self, label: str, model: str, args):
        self.label, self.port = label, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sparse_runtime.cli", "serve", model, "--engine", args.engine, "--host",
               "127.0.0.1", "--port", str(self.port), "--slots", str(args.slots), "--max-model-len",
               str(args.max_model_len), "--served-model-name", "m", "--max-queue", "1024"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.prefill_dtype:
            cmd += ["--prefill-dtype", args.prefill_dtype]
        if args.batch_dtype:
            cmd += ["--batch-dtype", args.batch_dtype]
        self.log = open(Path(args.work) / f"server-{label.replace(':', '')}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, SPARSE_RUNTIME_QUIET="1"))

    def wait_ready(self, timeout: float = 900) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label} exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server {self.label} did not start in {timeout} s")

    def memory_mb(self) -> dict[str, float]:
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
        except OSError:
            pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# -- load -------------------------------------------------------------------------------------------
async def one_request(client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed completion: token arrival times, finish_reason, error."""
    t0 = time.perf_counter()
    times, reason, err = [], None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "error": r.text[:200], "times": [], "start": t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    err = ev["error"]
                    continue
                ch = ev["choices"][0]
                now = time.perf_counter()
                times += [now] * len(ch.get("token_ids") or [])
                reason = ch.get("finish_reason") or reason
    except Exception as e:  # a dropped connection is a failed request
        err = repr(e)
    return {"status": 200, "start": t0, "times": times, "finish_reason": reason, "error": err}


def _body(prompt: str, tokens: int) -> dict[str, Any]:
    return {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}


async def run_level(url: str, prompts: list[str], level: str, n_requests: int, tokens: int, rate: float,
                    seed: int) -> list[dict[str, Any]]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)) as client:
        if level.startswith("c"):
            conc = int(level[1:])
            it = iter(range(n_requests))
            out: list[dict[str, Any]] = []

            async def worker():
                for i in it:
                    out.append(await one_request(client, url, _body(prompts[i % len(prompts)], tokens)))
            await asyncio.gather(*(worker() for _ in range(conc)))
            return out
        rng = random.Random(seed)
        tasks = []
        for i in range(n_requests):  # Poisson arrivals: exponential gaps
            tasks.append(asyncio.create_task(one_request(client, url, _body(prompts[i % len(prompts)], tokens))))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarise(results: list[dict[str, Any]], wall: float, tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200 and not r.get("error") and len(r["times"]) == tokens]
    ttft = [r["times"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    n_tok = sum(len(r["times"]) for r in results)
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    return {"requests": len(results), "failed": len(results) - len(ok), "ttft_p50_ms": ms(pct(ttft, 50)),
            "ttft_p99_ms": ms(pct(ttft, 99)), "itl_p50_ms": ms(pct(itl, 50)), "itl_p99_ms": ms(pct(itl, 99)),
            "output_tok_s": round(n_tok / wall, 2), "req_s": round(len(ok) / wall, 3), "wall_s": round(wall, 2),
            "_itl": itl, "_ttft": ttft}


def generate_ms_per_token(model: str, engine: str, prompts: list[str], tokens: int, threads: Optional[int],
                          n: int, dtype: Optional[str] = None, prefill_dtype: Optional[str] = None) -> dict[str, Any]:
    """``generate``'s own decode speed: ms per token after the first, median over ``n`` prompts."""
    from sparse_runtime.runtime import load_engine
    from sparse_runtime.serve.text import encode_text

    opts = {k: v for k, v in (("dtype", dtype), ("prefill_dtype", prefill_dtype)) if v}
    eng = load_engine(engine, model, threads=threads, **opts)
    try:
        per = []
        for p in prompts[:n + 1]:
            ids = encode_text(eng.tokenizer, p)
            t, stamps = time.perf_counter(), []
            for _ in eng.generate(ids, tokens):  # no eos: the full length, as ignore_eos
                stamps.append(time.perf_counter())
            per.append((stamps[-1] - stamps[0]) * 1e3 / max(1, len(stamps) - 1))
        per = per[1:]  # the first warms up
        return {"generate_ms_per_token": round(statistics.median(per), 3),
                "generate_ms_per_token_range": [round(min(per), 3), round(max(per), 3)]}
    finally:
        eng.close()
        del eng


# -- models and prompts -------------------------------------------------------------------------------
def prepare_models(args) -> dict[str, str]:
    if args.smoke:
        import sparse_runtime as sr

        from helpers_smoke import tiny_checkpoints

        return tiny_checkpoints(Path(args.work), sr)
    from bench_latency import checkpoints

    from sparse_runtime.models.loading import cache_dir, ensure_smollm2

    labels = [m for m in args.models.split(",") if m and m != "dense"]
    ck = checkpoints(cache_dir() / "bench-latency", labels)
    return {"dense": str(ensure_smollm2()), **{k: str(v) for k, v in ck.items()}}


def load_prompts(args) -> list[str]:
    try:
        from sparse_runtime.data import alpaca_prompt, alpaca_records

        recs = alpaca_records()
        rng = random.Random(args.seed)
        rng.shuffle(recs)
        prompts = [alpaca_prompt(r) for r in recs]
        return [p for p in prompts if len(p) <= args.max_prompt_chars][:2000]
    except Exception as e:
        if not args.smoke:
            raise
        print(f"smoke: no Alpaca data ({e}); synthetic prompts", flush=True)
        return [f"Instruction {i}: say something about the number {i}." for i in range(200)]


# -- the two modes ------------------------------------------------------------------------------------
def load_test(args, models: dict[str, str], prompts: list[str]) -> int:
    from sparse_runtime.report import save_results

    levels = [f"c{c}" for c in args.concurrency.split(",") if c] + ([f"poisson{args.rate:g}"] if args.rate > 0 else [])
    servers = {label: Server(label, path, args) for label, path in models.items()}
    rows: list[dict[str, Any]] = []
    try:
        for s in servers.values():
            s.wait_ready()
        for s in servers.values():  # warm-up: calibration is done at load; this fills caches and pools
            asyncio.run(run_level(s.url, prompts, "c4", 4, args.output_tokens, 0, args.seed))
        acc: dict[tuple[str, str], list[dict]] = {}
        for level in levels:
            conc = int(level[1:]) if level.startswith("c") else 16
            n = args.requests or max(4 * conc, 8)
            for rnd in range(args.rounds):
                for label, s in servers.items():
                    t = time.perf_counter()
                    res = asyncio.run(run_level(s.url, prompts[rnd * n:] + prompts, level, n, args.output_tokens,
                                                args.rate, args.seed + rnd))
                    summ = summarise(res, time.perf_counter() - t, args.output_tokens)
                    acc.setdefault((level, label), []).append(summ)
                    print(f"{level} round {rnd + 1}/{args.rounds} {label}: {summ['output_tok_s']} tok/s, ITL p50 "
                          f"{summ['itl_p50_ms']} ms, TTFT p50 {summ['ttft_p50_ms']} ms, failed {summ['failed']}",
                          flush=True)
        gen = {}
        if "c1" in levels and not args.no_generate:
            for label, path in models.items():  # after the load: one engine at a time in this process
                gen[label] = generate_ms_per_token(path, args.engine, prompts, args.output_tokens, args.threads,
                                                   args.generate_prompts, args.dtype, args.prefill_dtype)
        for (level, label), runs in acc.items():
            itl = [x for r in runs for x in r["_itl"]]
            ttft = [x for r in runs for x in r["_ttft"]]
            tok_s = [r["output_tok_s"] for r in runs]
            row = {"level": level, "model": label, "requests": sum(r["requests"] for r in runs),
                   "failed": sum(r["failed"] for r in runs),
                   "ttft_p50_ms": round(pct(ttft, 50) * 1e3, 2) if ttft else None,
                   "ttft_p99_ms": round(pct(ttft, 99) * 1e3, 2) if ttft else None,
                   "itl_p50_ms": round(pct(itl, 50) * 1e3, 2) if itl else None,
                   "itl_p99_ms": round(pct(itl, 99) * 1e3, 2) if itl else None,
                   "output_tok_s": round(statistics.median(tok_s), 2),
                   "output_tok_s_range": f"{min(tok_s):.1f}-{max(tok_s):.1f}",
                   "req_s": round(statistics.median(r["req_s"] for r in runs), 3),
                   "peak_rss_mb": round(servers[label].memory_mb().get("VmHWM", 0), 1),
                   "rss_mb": round(servers[label].memory_mb().get("VmRSS", 0), 1)}
            if level == "c1" and label in gen:
                row.update(gen[label])
                if row["itl_p50_ms"]:
                    row["itl_over_generate"] = round(row["itl_p50_ms"] / gen[label]["generate_ms_per_token"], 3)
            rows.append(row)
        for level in levels:  # speedup of each model's tokens/s over dense at the same level
            base = next((r for r in rows if r["level"] == level and r["model"] == "dense"), None)
            for r in rows:
                if base and r["level"] == level and base["output_tok_s"]:
                    r["tok_s_vs_dense"] = round(r["output_tok_s"] / base["output_tok_s"], 3)
    finally:
        for s in servers.values():
            s.stop()
    values = (f" --dtype {args.dtype}" if args.dtype else "") + (
        f" --prefill-dtype {args.prefill_dtype}" if args.prefill_dtype else "") + (
        f" --batch-dtype {args.batch_dtype}" if args.batch_dtype else "")
    notes = [f"engine {args.engine}{values} for every model (same build); {args.slots} slots x {args.max_model_len} "
             f"tokens; "
             f"threads {args.threads or 'default (min(2, cores))'}; one server process per model, interleaved rounds "
             f"({args.rounds} per level)",
             f"prompts: Alpaca template, shuffled with seed {args.seed}, at most {args.max_prompt_chars} characters; "
             f"{args.output_tokens} output tokens per request (greedy, ignore_eos), streamed",
             "closed loop at concurrency N: N clients, each sends its next request when its last ends; poisson: "
             f"open loop, exponential gaps at {args.rate:g} requests/s",
             "ITL = every gap between consecutive tokens of a request; TTFT = send to first token; tok/s and req/s "
             "over each round's wall time, median over rounds (range beside)",
             "peak_rss_mb = the server process's VmHWM at the end of the run (all levels, model loading "
             "included); rss_mb = its VmRSS then (weights + preallocated KV cache + runtime)",
             "generate_ms_per_token: Engine.generate in the benchmark process after the load test, median over "
             f"{args.generate_prompts} prompts; itl_over_generate = server ITL p50 at concurrency 1 / that",
             "goals (issue 18): c16 tok/s of wanda-70 >= 1.5x dense; c1 ITL within 10 % of generate"]
    title = "Serving: SmolLM2-135M dense vs Wanda 70 % vs 2:4 under load (sparse-runtime serve)"
    if args.smoke:
        title = "Serving smoke test (tiny random models; not a result)"
    save_results(args.name, title, rows, protocol="bench_serve load test", model=", ".join(models),
                 notes=notes, out_dir=args.out_dir)
    return 0


def engine_steps(args, models: dict[str, str]) -> int:
    """The server's ceiling: the engine's batched decode step alone, in this process (no HTTP, no
    prefill interleaved, no client on the cores). Every model's engine is loaded with the serve
    slots; each slot holds ``--steps-context`` random tokens; per round, per batch size, each model
    in turn times ``--steps-per-round`` steps (median over the rounds' per-step medians)."""
    import torch

    from sparse_runtime.report import save_results
    from sparse_runtime.runtime.registry import load_engine

    batches = [int(b) for b in args.steps_batches.split(",") if b]
    dtype = {k: v for k, v in (("dtype", args.dtype), ("prefill_dtype", args.prefill_dtype)) if v}
    # --steps-batch-dtypes float32,bfloat16: every model once per batch dtype, in the same rounds
    bds = [b for b in (args.steps_batch_dtypes or args.batch_dtype or "").split(",") if b] or [None]
    engines = {}
    for bd in bds:
        for label, path in models.items():
            key = f"{label} [{bd}]" if len(bds) > 1 else label
            engines[key] = load_engine(args.engine, path, threads=args.threads, **dtype,
                                       **({"batch_dtype": bd} if bd else {}))
    g = torch.Generator().manual_seed(args.seed)
    for e in engines.values():
        e.init_slots(max(batches), args.max_model_len)
    times: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.steps_rounds + 1):  # round 0 warms up
        for b in batches:
            for label, e in engines.items():
                ids = torch.randint(3, e.vocab_size, (b,), generator=g).tolist()
                per = []
                for _ in range(args.steps_per_round):
                    for s in range(b):  # every slot back to the same context: equal work each step
                        e.free_slot(s)
                        e.lean.slot_len[s] = args.steps_context
                    t = time.perf_counter()
                    e.decode_slots(list(range(b)), ids)
                    per.append(time.perf_counter() - t)
                if rnd:
                    times.setdefault((label, b), []).append(statistics.median(per))
    rows = []
    for (label, b), ts in times.items():
        med = statistics.median(ts)
        rows.append({"model": label, "batch": b, "step_ms": round(med * 1e3, 2),
                     "step_ms_range": f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}",
                     "tok_s": round(b / med, 1)})
    for r in rows:  # over the dense model with the same batch dtype
        dense = "dense" + r["model"][len(r["model"].split(" [")[0]):]
        base = next((x for x in rows if x["model"] == dense and x["batch"] == r["batch"]), None)
        if base:
            r["tok_s_vs_dense"] = round(r["tok_s"] / base["tok_s"], 3)
    rows.sort(key=lambda r: (r["batch"], list(engines).index(r["model"])))
    if len(bds) == 1 and bds[0]:
        dtype["batch_dtype"] = bds[0]
    values = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in dtype.items())
    if len(bds) > 1:
        values += f"{' ' if values else ''}--batch-dtype as in each row's [brackets], every model with each"
    notes = [f"engine {args.engine}{' ' + values if values else ''}, {args.threads or 'default (min(2, cores))'} "
             f"threads, in one process; "
             f"LeanLlama.decode_slots on slots holding {args.steps_context} tokens of context (batch 1: the C "
             "step on the slot; batch > 1: the batched C step, sr_decode_step_batch)",
             f"{args.steps_rounds} interleaved rounds after a warm-up round; per round {args.steps_per_round} steps, "
             "median; step_ms = median over rounds, range = min-max over rounds",
             "the ceiling of the load test: no HTTP, no prefill chunks between steps, no client process"]
    save_results(args.name + "_steps", "Serving ceiling: the batched decode step alone, dense vs sparse", rows,
                 protocol="bench_serve engine steps", model=", ".join(models), notes=notes, out_dir=args.out_dir)
    for e in engines.values():
        e.close()
    return 0


async def soak_client(url: str, prompts: list[str], args, stop_at: float, stats: dict, rng: random.Random,
                      ctx_prompt: str) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        i = 0
        while time.time() < stop_at:
            i += 1
            if rng.random() < args.bad_fraction:
                kind = BAD_KINDS[stats["bad_sent"] % len(BAD_KINDS)]
                stats["bad_sent"] += 1
                body: Any = _body("hello", 4)
                if kind == "model":
                    body["model"] = "no-such-model"
                elif kind == "n":
                    body["n"] = 2
                elif kind == "prompt_len":
                    body["prompt"] = ctx_prompt
                elif kind == "max_tokens":
                    body["max_tokens"] = args.max_model_len
                elif kind == "option":
                    body["frobnicate"] = True
                content = "{not json" if kind == "json" else json.dumps(body)
                try:
                    r = await client.post(url + "/v1/completions", content=content,
                                          headers={"content-type": "application/json"})
                    ok = 400 <= r.status_code < 500 and "error" in r.json()
                except Exception:
                    ok = False
                stats["bad_refused" if ok else "bad_wrong"] += 1
                continue
            res = await one_request(client, url, _body(prompts[rng.randrange(len(prompts))], args.output_tokens))
            good = (res["status"] == 200 and not res.get("error") and res.get("finish_reason") in ("length", "stop"))
            stats["valid_ok" if good else "valid_failed"] += 1
            stats["tokens"] += len(res["times"])
            if not good and len(stats["failures"]) < 20:
                stats["failures"].append({k: res.get(k) for k in ("status", "error", "finish_reason")})


def soak(args, models: dict[str, str], prompts: list[str]) -> int:
    from sparse_runtime.report import save_results

    label = args.soak_model
    server = Server(label, models[label], args)
    stats: dict[str, Any] = {"valid_ok": 0, "valid_failed": 0, "bad_sent": 0, "bad_refused": 0, "bad_wrong": 0,
                             "tokens": 0, "failures": []}
    samples: list[tuple[float, float]] = []
    try:
        server.wait_ready()
        t0 = time.time()
        stop_at = t0 + args.soak

        async def main():
            rng = random.Random(args.seed)
            ctx_prompt = "word " * (args.max_model_len + 8)
            clients = [asyncio.create_task(soak_client(server.url, prompts, args, stop_at, stats,
                                                       random.Random(rng.random()), ctx_prompt))
                       for _ in range(args.soak_concurrency)]
            while time.time() < stop_at:
                samples.append((round(time.time() - t0, 1), server.memory_mb().get("VmRSS", 0)))
                await asyncio.sleep(min(5.0, max(0.5, args.soak / 100)))
            await asyncio.gather(*clients)
            samples.append((round(time.time() - t0, 1), server.memory_mb().get("VmRSS", 0)))
        asyncio.run(main())
        wall = time.time() - t0
    finally:
        peak = server.memory_mb().get("VmHWM", 0)
        server.stop()
    warm = [m for t, m in samples if t >= args.soak_warmup]
    base = warm[0] if warm else samples[0][1]
    tail_t = samples[-1][0] - min(60.0, args.soak / 5)
    tail = [m for t, m in samples if t >= tail_t] or [samples[-1][1]]
    growth = (statistics.mean(tail) - base) / base * 100 if base else float("nan")
    passed = stats["valid_failed"] == 0 and stats["bad_wrong"] == 0 and growth < 5.0
    row = {"model": label, "seconds": round(wall, 1), "concurrency": args.soak_concurrency,
           "valid_ok": stats["valid_ok"], "valid_failed": stats["valid_failed"], "malformed_sent": stats["bad_sent"],
           "malformed_refused_4xx": stats["bad_refused"], "malformed_wrong": stats["bad_wrong"],
           "output_tok_s": round(stats["tokens"] / wall, 2), "rss_after_warmup_mb": round(base, 1),
           "rss_end_mb": round(statistics.mean(tail), 1), "rss_growth_pct": round(growth, 2),
           "peak_rss_mb": round(peak, 1), "pass": passed}
    notes = [f"{args.soak_concurrency} closed-loop clients for {args.soak} s, {args.bad_fraction:.0%} malformed "
             f"(cycling {', '.join(BAD_KINDS)}), {args.output_tokens} output tokens per valid request",
             f"RSS sampled every {min(5.0, max(0.5, args.soak / 100)):g} s; growth = mean of the last "
             f"{min(60.0, args.soak / 5):g} s over the first sample after {args.soak_warmup:g} s warm-up",
             "pass = no failed valid request, every malformed one answered 4xx with an error body, growth < 5 %"]
    title = f"Serving soak: {label}, concurrency {args.soak_concurrency}, {args.soak:g} s"
    if args.smoke:
        title += " (smoke, tiny model: not a result)"
    save_results(args.name + "_soak", title, [row], protocol="bench_serve soak", model=models[label], notes=notes,
                 out_dir=args.out_dir, extra={"rss_samples": samples, "failures": stats["failures"]})
    return 0 if passed else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random models, few requests (< 1 minute)")
    ap.add_argument("--models", default="dense,wanda-70,wanda-2:4", help="labels (bench_latency.py's CONFIGS)")
    ap.add_argument("--engine", default="sparse-cpu")
    ap.add_argument("--dtype", default=None, help="the servers' --dtype (e.g. int8: int8 codes and lm_head)")
    ap.add_argument("--prefill-dtype", default=None, choices=("float32", "bfloat16"),
                    help="the servers' --prefill-dtype (bfloat16: prompts on AMX tiles where the CPU has them)")
    ap.add_argument("--batch-dtype", default=None, choices=("float32", "bfloat16"),
                    help="the servers' --batch-dtype (bfloat16: batched decode steps' sparse products on AMX tiles)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second (0: no Poisson level)")
    ap.add_argument("--requests", type=int, default=0, help="requests per level and round (default max(4 x N, 8))")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-chars", type=int, default=800)
    ap.add_argument("--generate-prompts", type=int, default=5)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soak", type=float, default=0, help="run the soak for this many seconds instead")
    ap.add_argument("--soak-model", default="wanda-70")
    ap.add_argument("--soak-concurrency", type=int, default=16)
    ap.add_argument("--soak-warmup", type=float, default=60)
    ap.add_argument("--bad-fraction", type=float, default=0.05)
    ap.add_argument("--steps", action="store_true", help="time the engine's batched decode step alone instead "
                    "(the load test's ceiling; writes <name>_steps)")
    ap.add_argument("--steps-batches", default="1,4,16")
    ap.add_argument("--steps-batch-dtypes", default=None,
                    help="with --steps: e.g. float32,bfloat16 times every model with each --batch-dtype, paired")
    ap.add_argument("--steps-context", type=int, default=128)
    ap.add_argument("--steps-rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=8)
    ap.add_argument("--name", default="serve")
    ap.add_argument("--out-dir", default=None, help="default $SPARSE_RUNTIME_CACHE/bench-serve (outside the repo)")
    ap.add_argument("--work", default=None, help="server logs and smoke checkpoints (default under the cache)")
    args = ap.parse_args()
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")
    from sparse_runtime.models.loading import cache_dir

    args.out_dir = args.out_dir or str(cache_dir() / "bench-serve")
    args.work = args.work or str(cache_dir() / "bench-serve" / ("work-smoke" if args.smoke else "work"))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.concurrency, args.rounds, args.output_tokens = "1,4", 1, 8
        args.requests = args.requests or 8
        args.rate = args.rate if args.rate != 2.0 else 20.0
        args.max_model_len, args.generate_prompts = 256, 2
        args.max_prompt_chars = min(args.max_prompt_chars, 200)
        args.soak_warmup = min(args.soak_warmup, args.soak / 3)
        args.name = args.name + "_smoke"
    t0 = time.perf_counter()
    models = prepare_models(args)
    prompts = load_prompts(args)
    if args.steps:
        rc = engine_steps(args, models)
    else:
        rc = soak(args, models, prompts) if args.soak else load_test(args, models, prompts)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
