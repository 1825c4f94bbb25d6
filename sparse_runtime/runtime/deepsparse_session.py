"""A long-lived DeepSparse worker: compiled engines stay loaded between calls.

Runs INSIDE the DeepSparse env (Python 3.11, deepsparse 1.8.0, numpy<2); imports nothing from
sparse_runtime. The one-shot worker of :mod:`deepsparse_worker` (exporters' check) compiles per
request; the runtime needs engines that persist (a generate loop, alternating benchmark runs), and
timings taken inside this process so the pipe is not timed.

Protocol: one JSON request per stdin line; one ``@@SPARSE-RUNTIME-RESULT@@ {json}`` line per
request on stdout (DeepSparse prints banners of its own). Tensors travel as .npy files.

Ops:
- ``compile``  {key, model, batch_size, num_cores} -> share of optimised ops, compile seconds, RSS;
  the engine is built on a COPY of the .onnx (DeepSparse rewrites the file it is given);
- ``release``  {key};
- ``prefill``  {prefill, decode|null, ids, out, L, C} -> logits of the real tokens (npy); keeps the
  fixed-size cache (the exporters' deepsparse layout: prompt left-padded to L; cache of C-1 entries,
  empty slots on the left with mask 0);
- ``decode``   {decode, ids, out} -> logits; shifts the cache by one;
- ``time_prefill`` {prefill, ids, L, repeats} -> seconds per run;
- ``prepare_decode`` {prefill, decode, ids, L, C} then ``time_decode`` {decode, ids [B, steps]}
  -> seconds for the steps, restarting from the prepared cache each time;
- ``rss``; ``quit``.
"""
import json
import os
import shutil
import sys
import tempfile
import time

TAG = "@@SPARSE-RUNTIME-RESULT@@"
os.environ["NM_DISABLE_ANALYTICS"] = "1"

LOADED = {}  # the engines this session process has loaded, by key (not the runtime registry ENGINES)
STATE = {}
SNAPSHOT = {}


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _compile(req):
    from deepsparse import Engine

    key = req["key"]
    tmp = tempfile.mkdtemp(prefix="ds-session-")
    try:
        src = req["model"]
        copy = os.path.join(tmp, os.path.basename(src))
        shutil.copy2(src, copy)
        if os.path.exists(src + "_data"):
            shutil.copy2(src + "_data", copy + "_data")
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        eng = Engine(copy, batch_size=int(req.get("batch_size", 1)), num_cores=req.get("num_cores"))
        sec = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOADED[key] = eng
    return {"fraction_of_supported_ops": float(eng.fraction_of_supported_ops), "compile_seconds": sec,
            "rss_delta_mb": _rss_mb() - rss0, "input_names": list(eng.input_names),
            "output_names": list(eng.output_names)}


def _feeds(eng, named):
    return [named[n] for n in eng.input_names]


def _prefill(key, ids, L):
    import numpy as np

    b, n = ids.shape
    pad = L - n
    named = {"input_ids": np.concatenate([np.zeros((b, pad), np.int64), ids], 1),
             "attention_mask": np.concatenate([np.zeros((b, pad), np.int64), np.ones((b, n), np.int64)], 1),
             "position_ids": np.concatenate([np.zeros((b, pad), np.int64),
                                             np.tile(np.arange(n, dtype=np.int64), (b, 1))], 1)}
    eng = LOADED[key]
    return eng.run(_feeds(eng, named)), eng


def _start_cache(outs, names, n, L, C):
    import numpy as np

    b = outs[0].shape[0]
    past = {}
    for name, p in zip(names[1:], outs[1:]):
        h, d = p.shape[1], p.shape[3]
        buf = np.zeros((b, h, C - 1, d), np.float32)
        buf[:, :, C - 1 - n:] = p[:, :, L - n:]
        past[name.replace("present", "past_key_values")] = buf
    if n > C - 1:
        raise ValueError(f"{n} tokens do not fit a cache of {C}")
    mask = np.zeros((b, C - 1), np.int64)
    mask[:, C - 1 - n:] = 1
    return {"past": past, "mask": mask, "pos": n, "C": C}  # (the decode step copies each shifted cache: ~1 ms/token)


def _decode_step(key, ids, state):
    import numpy as np

    b = ids.shape[0]
    eng = LOADED[key]
    if state["pos"] >= int(state.get("C", 1 << 30)):
        # DeepSparse 1.8 aborts the whole process on a position id >= the cache length it compiled
        raise ValueError(f"position {state['pos']} is past the static cache length {state['C']}")
    named = dict(state["past"])
    named["input_ids"] = np.ascontiguousarray(ids.reshape(b, 1))
    named["position_ids"] = np.full((b, 1), state["pos"], np.int64)
    named["attention_mask"] = np.concatenate([state["mask"], np.ones((b, 1), np.int64)], 1)
    outs = eng.run(_feeds(eng, named))
    past = {}
    for name, p in zip(eng.output_names[1:], outs[1:]):
        past[name.replace("present", "past_key_values")] = np.ascontiguousarray(p[:, :, 1:])
    mask = np.ascontiguousarray(named["attention_mask"][:, 1:])
    return outs[0], {"past": past, "mask": mask, "pos": state["pos"] + 1, "C": state["C"]}


def handle(req):
    import numpy as np

    op = req.get("op")
    if op == "compile":
        return _compile(req)
    if op == "release":
        LOADED.pop(req["key"], None)
        return {"released": req["key"]}
    if op == "rss":
        return {"rss_mb": _rss_mb()}
    if op == "prefill":
        ids = np.load(req["ids"]).astype(np.int64)
        n = ids.shape[1]
        outs, eng = _prefill(req["prefill"], ids, int(req["L"]))
        np.save(req["out"], outs[0][:, -n:])
        if req.get("decode"):
            STATE["seq"] = _start_cache(outs, eng.output_names, n, int(req["L"]), int(req["C"]))
        return {"logits": req["out"]}
    if op == "decode":
        ids = np.load(req["ids"]).astype(np.int64)
        logits, STATE["seq"] = _decode_step(req["decode"], ids, STATE["seq"])
        np.save(req["out"], logits)
        return {"logits": req["out"]}
    if op == "time_prefill":
        ids = np.load(req["ids"]).astype(np.int64)
        times = []
        for _ in range(int(req.get("repeats", 1))):
            t = time.perf_counter()
            _prefill(req["prefill"], ids, int(req["L"]))
            times.append(time.perf_counter() - t)
        return {"seconds": times}
    if op == "prepare_decode":
        ids = np.load(req["ids"]).astype(np.int64)
        outs, eng = _prefill(req["prefill"], ids, int(req["L"]))
        SNAPSHOT[req["decode"]] = _start_cache(outs, eng.output_names, ids.shape[1], int(req["L"]), int(req["C"]))
        return {"prepared": req["decode"]}
    if op == "time_decode":
        ids = np.load(req["ids"]).astype(np.int64)
        state = SNAPSHOT[req["decode"]]
        t = time.perf_counter()
        for i in range(ids.shape[1]):
            _, state = _decode_step(req["decode"], ids[:, i:i + 1], state)
        return {"seconds": [time.perf_counter() - t]}
    return {"error": f"unknown op {op!r}"}


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            res = handle(req)
        except Exception as e:  # report, keep serving
            res = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write("\n" + TAG + " " + json.dumps(res) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
