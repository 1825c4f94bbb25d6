"""``sparse-runtime serve`` with the real ``openai`` client against a live server (loopback,
ephemeral port) on a tiny pruned Llama: plain and streamed completions and chat equal to
``engine.generate`` token for token, alone and 16 at once (continuous batching); a disconnect frees
its slot; the queue bound answers 429; every bad request gets its 4xx and the server keeps serving;
the fallback engine (torch-cpu, sequences in turn); SIGTERM drains."""
import json
import re
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import save_tiny_pruned  # noqa: E402

from sparse_runtime.kernels import available  # noqa: E402
from sparse_runtime.runtime import load_engine  # noqa: E402
from sparse_runtime.serve import ServeConfig  # noqa: E402
from sparse_runtime.serve.server import ServerThread  # noqa: E402

pytestmark = pytest.mark.skipif(not available(), reason="sparse kernels unavailable")
MODEL = "tiny"
CTX = 96
PROMPTS = ["Hello", "The capital of France is", "a", "Sparse kernels on a CPU", "0123456789" * 3, "xyz", "Once upon",
           "serve me", "batching", "q", "tokens per second", "ABCDEFG", "lorem ipsum", "zz", "final", "sixteen!"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_pruned(tmp_path_factory.mktemp("serve") / "tiny", sparsity=0.7)


@pytest.fixture(scope="module")
def server(ckpt):
    eng = load_engine("sparse-cpu", str(ckpt), threads=1)
    srv = ServerThread(eng, ServeConfig(slots=16, max_model_len=CTX, prefill_chunk=8, max_queue=4), MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def reference(engine, prompt: str, n: int) -> list[int]:
    return list(engine.generate(list(prompt.encode()), n, eos_token_id=0))


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^sparse_runtime_{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def labelled(server, name: str, label: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^sparse_runtime_{re.escape(name)}\{{{re.escape(label)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def bucket(server, name: str, le: str) -> float:
    return labelled(server, name + "_bucket", f'le="{le}"')


def wait_for(cond, timeout=5.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("requests_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "queue_depth", "kv_cache_usage_ratio", "slots_total 16"):
        assert "sparse_runtime_" + name in text


def test_completion_plain_and_streamed_equal_generate(server, client):
    eng = server.state.engine
    ref = reference(eng, "Hello", 12)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    assert r.choices[0].token_ids == ref
    assert r.choices[0].text == eng.tokenizer.decode(ref) if eng.tokenizer else True
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(ref) == r.usage.total_tokens - 5
    ids, text, last = [], "", None
    for ch in client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stream=True):
        ids += ch.choices[0].token_ids
        text += ch.choices[0].text
        last = ch
    assert ids == ref and text == r.choices[0].text
    assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 12


def test_chat_plain_and_streamed(server, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ref = reference(server.state.engine, "system: be brief\nuser: hi\nassistant:", 10)  # the fallback template
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].token_ids == ref and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum((c.choices[0].token_ids for c in chunks), []) == ref
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_sixteen_concurrent_equal_generate(server, client):
    """16 requests at once, different prompt and output lengths (sequences join and leave the batch
    at different steps, prompts prefilled in chunks of 8): each equals its own generate."""
    eng = server.state.engine
    n_out = [6 + (i * 7) % 23 for i in range(16)]
    refs = [reference(eng, p, n) for p, n in zip(PROMPTS, n_out)]
    got: dict[int, list[int]] = {}
    multi_before = metric(server, "batch_size_count") - bucket(server, "batch_size", "1")

    def one(i):
        if i % 2:
            got[i] = sum((c.choices[0].token_ids for c in client.completions.create(
                model=MODEL, prompt=PROMPTS[i], max_tokens=n_out[i], temperature=0, stream=True)), [])
        else:
            got[i] = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=n_out[i],
                                               temperature=0).choices[0].token_ids

    ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert [got.get(i) for i in range(16)] == refs
    assert metric(server, "batch_size_count") - bucket(server, "batch_size", "1") > multi_before  # batched steps ran
    assert wait_for(lambda: metric(server, "slots_used") == 0)


def test_sampling_seed_and_stop(server, client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=20, temperature=0.8, top_p=0.9, seed=7, extra_body={"top_k": 50})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].token_ids == b.choices[0].token_ids  # seeded: reproducible
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[3:5]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.find(stop)]


def _slow(server, seconds=0.01):
    """Make each decode step take ``seconds`` (so a test can act while a sequence runs)."""
    slots = server.state.slots
    orig = slots.decode

    def decode(s, t):
        time.sleep(seconds)
        return orig(s, t)
    slots.decode = decode
    return lambda: setattr(slots, "decode", orig)


def test_disconnect_frees_slot(server):
    undo = _slow(server)
    try:
        cancelled = labelled(server, "requests_total", 'finish_reason="cancelled"')
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 80, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert metric(server, "slots_used") == 1
        assert wait_for(lambda: metric(server, "slots_used") == 0, 2.0)
        assert labelled(server, "requests_total", 'finish_reason="cancelled"') == cancelled + 1
        body["stream"] = False  # a client waiting for a JSON answer that gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        assert wait_for(lambda: metric(server, "slots_used") == 0, 2.0)
        assert labelled(server, "requests_total", 'finish_reason="cancelled"') == cancelled + 2
    finally:
        undo()


def test_queue_bound_answers_429(server, client):
    """Free slots take a burst; beyond them ``max_queue`` (4) requests wait, the next gets 429."""
    sched = server.state.scheduler
    sched.hold(True)
    results = []
    n = len(sched.free_slots) + 4
    try:
        ts = [threading.Thread(target=lambda: results.append(
            client.completions.create(model=MODEL, prompt="q", max_tokens=3, temperature=0))) for _ in range(n)]
        for t in ts:
            t.start()
        assert wait_for(lambda: len(sched.waiting) == n)
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "q", "max_tokens": 3})
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="q", max_tokens=3)
    finally:
        sched.hold(False)
    for t in ts:
        t.join(30)
    assert len(results) == n and all(len(r.choices[0].token_ids) == 3 for r in results)


BAD = [  # (body, status, param or code)
    ("{not json", 400, None),
    ('["a list"]', 400, None),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x" * CTX}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "max_tokens": CTX}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,what", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_request_gets_4xx_and_server_keeps_serving(server, client, body, status, what):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if what:
        assert what in (err["param"], err["code"])
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert ok.choices[0].token_ids == reference(server.state.engine, "Hello", 4)


def test_bad_chat_and_unknown_route(server, client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    r = httpx.get(server.url + "/v2/whatever")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_fallback_engine_in_turn(ckpt):
    """torch-cpu has no slot interface: sequences are served in turn with their state swapped."""
    eng = load_engine("torch-cpu", str(ckpt), threads=1)
    srv = ServerThread(eng, ServeConfig(slots=4, max_model_len=64), MODEL)
    try:
        assert not srv.state.slots.batched
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        refs = [reference(eng, p, 8) for p in PROMPTS[:3]]
        got = {}
        ts = [threading.Thread(target=lambda i=i: got.__setitem__(i, c.completions.create(
            model=MODEL, prompt=PROMPTS[i], max_tokens=8, temperature=0).choices[0].token_ids)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert [got.get(i) for i in range(3)] == refs
    finally:
        srv.stop()


def test_sigterm_drains_with_clear_finish_reason(ckpt):
    import signal

    eng = load_engine("lean-cpu", str(ckpt), threads=1)
    srv = ServerThread(eng, ServeConfig(slots=2, max_model_len=CTX, shutdown_grace=0.3), MODEL)
    undo = _slow(srv, 0.02)
    try:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 80, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            next(lines)
            srv.server.handle_exit(signal.SIGTERM, None)
            assert srv.state.scheduler.draining
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        assert srv.state.scheduler.draining
    finally:
        undo()
        srv.stop()


def test_request_timeout(ckpt):
    eng = load_engine("lean-cpu", str(ckpt), threads=1)
    srv = ServerThread(eng, ServeConfig(slots=2, max_model_len=CTX, request_timeout=0.3), MODEL)
    undo = _slow(srv, 0.02)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=80, temperature=0)
        assert r.choices[0].finish_reason == "timeout" and 0 < r.usage.completion_tokens < 80
        assert wait_for(lambda: srv.state.scheduler.free_slots and len(srv.state.scheduler.free_slots) == 2)
    finally:
        undo()
        srv.stop()
