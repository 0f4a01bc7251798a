"""End to end: the OpenAI-compatible HTTP API of a real `expertmesh up` (Redis, 2 pools, the gateway as processes,
fp32 dispatch, an API key), driven by the official `openai` client, against the in-process engine on the same
checkpoint. One deployment for the module."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.format.tokenizer import load_tokenizer
from services.gateway.chat_template import ChatTemplate
from services.gateway.sampling import SamplingParams
from tests.local_deployment import UpProcess
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not any(
            os.access(os.path.join(p, "redis-server"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)
        ),
        reason="redis-server is not installed (scripts/bootstrap.sh installs it)",
    ),
]

KEY = "test-key-1"
PROMPTS = [[5, 17, 300, 42], [9, 8, 7, 6, 5, 4, 3], [100, 200], [511, 2, 77, 13, 40, 41]]
TEXTS = ["Hello, world! naïve", "The gateway runs attention.", "中文 é", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def up(tiny_fp8, tmp_path_factory):
    previous = os.environ.get("EXPERTMESH_API_KEY")
    os.environ["EXPERTMESH_API_KEY"] = KEY  # the gateway reads it; UpProcess copies the environment
    try:
        deployment = UpProcess(tiny_fp8, pools=2, dispatch="fp32", home=tmp_path_factory.mktemp("up-http"))
    finally:
        if previous is None:
            os.environ.pop("EXPERTMESH_API_KEY")
        else:
            os.environ["EXPERTMESH_API_KEY"] = previous
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def client(up):
    with openai.OpenAI(base_url=up.http, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_fp8):
    return tiny_fp8.name


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]


def test_models_and_health(up, client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model] and models[0].object == "model"
    root = up.http.removesuffix("/v1")
    assert urllib.request.urlopen(f"{root}/health", timeout=10).status == 200  # open without a key
    metrics = urllib.request.urlopen(f"{root}/metrics", timeout=10).read().decode()
    assert "time_to_first_token_seconds" in metrics


def test_greedy_completions_equal_the_in_process_engine(client, model, engine_tiny):
    out = client.completions.create(
        model=model,
        prompt=PROMPTS,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    local = engine_tiny.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    for choice, expected in zip(out.choices, local):
        assert choice.token_ids == expected.token_ids
        assert choice.text == engine_tiny.decode(expected.token_ids)
        assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert out.usage.completion_tokens == 12 * len(PROMPTS)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_text_equals_the_non_streamed_text(client, model):
    """Also for non-ASCII output (multi-byte characters split over tokens are never sent broken)."""
    non_ascii = 0
    for text in TEXTS:
        kwargs = dict(model=model, messages=_chat(text), max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        whole = client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == whole
        assert chunks[-1].choices[0].finish_reason == "length"
        non_ascii += any(ord(ch) > 127 for ch in whole)
        completion = client.completions.create(
            model=model, prompt=text, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        pieces = client.completions.create(
            model=model, prompt=text, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        assert "".join(c.choices[0].text for c in pieces) == completion.choices[0].text
    assert non_ascii, "no output held a non-ASCII character: the check would prove nothing"


def test_chat_usage_counts_the_rendered_prompt(client, model, tiny_fp8):
    template, tok = ChatTemplate.from_dir(tiny_fp8), load_tokenizer(tiny_fp8)
    messages = _chat("How are you?")
    expected = len(tok.encode(template.render(messages), add_special_tokens=False).ids)
    out = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert out.usage.prompt_tokens == expected == len(out.choices[0].prompt_token_ids)
    assert out.usage.completion_tokens == 5 == len(out.choices[0].token_ids)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"


def test_a_shared_system_prompt_is_read_from_the_prefix_cache(up, client, model, engine_tiny):
    """A second chat with the same long system message reads its blocks (64 tokens each) from the gateway's cache:
    `usage.prompt_tokens_details.cached_tokens` says how many, the output is still the in-process engine's, and
    the gateway's prefix-cache counters grow by the same count."""
    system = "You are the test assistant of a gateway that caches the prompts it has seen. " * 12
    asked = {}
    for question in ("What is cached?", "What is computed?"):
        asked[question] = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    first, second = asked.values()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached < second.usage.prompt_tokens and cached % 64 == 0
    prompt = second.choices[0].prompt_token_ids
    expected = engine_tiny.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert second.choices[0].token_ids == expected
    metrics = urllib.request.urlopen(f"{up.http.removesuffix('/v1')}/metrics", timeout=10).read().decode()
    hits = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("prefix_cache_hits_total{")]
    assert hits and hits[0] >= cached
    with grpc.insecure_channel(up.gateway) as channel:  # gRPC tells it on the last message
        replies = list(
            gateway_pb2_grpc.GatewayServiceStub(channel).Generate(
                gateway_pb2.GenerateRequest(
                    token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
                ),
                metadata=[("authorization", f"Bearer {KEY}")],
                timeout=60,
            )
        )
    whole = (len(prompt) - 1) // 64 * 64  # the same prompt again: all its blocks but the one with its last token
    assert replies[-1].finish_reason == "length" and replies[-1].cached_prompt_tokens == whole >= cached
    assert [t for r in replies for t in r.token_ids] == expected[:3]
    salted = [
        client.completions.create(
            model=model, prompt=prompt, max_tokens=2, temperature=0, extra_body={"ignore_eos": True, "cache_salt": salt}
        ).usage.prompt_tokens_details.cached_tokens
        for salt in ("tenant-a", "tenant-a", "tenant-b")
    ]
    assert salted == [0, whole, 0]  # another salt's requests share nothing, not even the unsalted blocks
    with grpc.insecure_channel(up.gateway) as channel:  # the same salt over gRPC
        *_, last = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(
            gateway_pb2.GenerateRequest(
                token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_tokens=2), cache_salt="tenant-b"
            ),
            metadata=[("authorization", f"Bearer {KEY}")],
            timeout=60,
        )
    assert last.cached_prompt_tokens == whole
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(model=model, prompt=prompt, max_tokens=2, extra_body={"cache_salt": ""})


def test_include_usage_in_the_stream(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=_chat("Hi"),
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(
        client.chat.completions.create(
            model=model, messages=_chat("Hi"), max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_logprobs_are_the_models(client, model, engine_tiny):
    prompt = PROMPTS[0]
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    scores = engine_tiny.score(prompt + out.token_ids, top_k=3)[len(prompt) :]
    for got, top, s in zip(lp.token_logprobs, lp.top_logprobs, scores):
        assert got == pytest.approx(s.logprob, abs=1e-4)
        assert len(top) <= 3 and max(top.values()) == pytest.approx(got, abs=1e-6)  # greedy: the best token
    chat = client.chat.completions.create(
        model=model,
        messages=_chat("Hi"),
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)
    assert all(isinstance(c.bytes, list) for c in content)
    streamed = [
        c
        for chunk in client.chat.completions.create(
            model=model,
            messages=_chat("Hi"),
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content
    ]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_echo_with_logprobs_scores_the_prompt(client, model, engine_tiny):
    prompt = PROMPTS[1]
    out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1).choices[0]
    assert out.text == engine_tiny.decode(prompt)
    scores = engine_tiny.score(prompt, top_k=1)
    assert out.logprobs.token_logprobs[0] is None
    assert out.logprobs.token_logprobs[1:] == pytest.approx([s.logprob for s in scores[1:]], abs=1e-4)


def test_stop_strings_end_the_text_before_them(up, client, model):
    base = client.completions.create(
        model=model,
        prompt="The quick brown",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    text = base.text
    start = next(i for i in range(4, len(text) - 3) if text[i : i + 3].strip() and text.find(text[i : i + 3]) == i)
    stop = text[start : start + 3]
    for stream in (False, True):
        kwargs = dict(
            model=model,
            prompt="The quick brown",
            max_tokens=24,
            temperature=0,
            stop=[stop, "never-seen"],
            extra_body={"ignore_eos": True},
        )
        if stream:
            chunks = list(client.completions.create(**kwargs, stream=True))
            got, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(**kwargs)
            got, finish = out.choices[0].text, out.choices[0].finish_reason
            assert out.usage.completion_tokens < 24  # cancelled once the stop string was seen
        assert got == text[:start] and stop not in got and finish == "stop"
    wait_until(lambda: up.metric("gateway", "kv_cache_usage_perc") == 0, 30, "the stopped requests' cache to be freed")


def test_n_choices_use_seed_plus_i(client, model):
    kwargs = dict(model=model, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    both = client.chat.completions.create(messages=_chat("Tell me"), n=2, seed=40, **kwargs)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.completion_tokens == 16
    for i in range(2):
        single = client.chat.completions.create(messages=_chat("Tell me"), seed=40 + i, **kwargs)
        assert single.choices[0].message.content == both.choices[i].message.content
    streamed = {}
    for chunk in client.chat.completions.create(messages=_chat("Tell me"), n=2, seed=40, stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[0], streamed[1]] == [c.message.content for c in both.choices]


def test_32_concurrent_streaming_chats(client, model):
    def one(i: int) -> tuple[str, str | None]:
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=_chat(f"Request {i}"),
                max_tokens=10,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(finish == "length" for _, finish in results)
    for i in (0, 17, 31):
        alone = client.chat.completions.create(
            model=model, messages=_chat(f"Request {i}"), max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert alone.choices[0].message.content == results[i][0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(extra_body={"temperature": "NaN"}),
        dict(extra_body={"temperature": "inf"}),
        dict(temperature=-1),
        dict(top_p=0),
        dict(extra_body={"temperature": "hot"}),
        dict(max_tokens=10**7),
        dict(n=0),
        dict(logprobs=21),
        dict(stop=["a", "b", "c", "d", "e"]),
        dict(stop=[""]),
        dict(model="no-such-model"),
        dict(prompt=[]),
        dict(prompt=[10**6]),
        dict(seed=-1),
    ],
)
def test_bad_parameters_are_bad_requests(client, model, kwargs):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": model, "prompt": "x", "max_tokens": 2, **kwargs})
    assert err.value.status_code == 400
    assert set(err.value.body) >= {"message", "type", "param", "code"}


def test_other_errors_raise_the_clients_matching_exception(up, client, model):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=_chat("x"), top_logprobs=2)  # without logprobs
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x"}])
    for field, call, extra in (
        ("top_logprobs", client.chat.completions.create, dict(messages=_chat("x"), logprobs=True, top_logprobs=25)),
        ("logprobs", client.completions.create, dict(prompt="x", logprobs=-1)),
    ):
        with pytest.raises(openai.BadRequestError) as err:  # named by the field the client set
            call(model=model, max_tokens=2, **extra)
        assert err.value.body["param"] == field and err.value.body["message"].startswith(f"{field} must lie in")
    for field, value in (("temperature", -1), ("top_p", 0), ("max_tokens", 10**8), ("seed", -1), ("stop", ["a"] * 5)):
        with pytest.raises(openai.BadRequestError) as err:  # the sampling parameters' errors name theirs too
            client.completions.create(model=model, prompt="x", **{"max_tokens": 2, field: value})
        assert err.value.body["param"] == field and err.value.body["message"].startswith(field)
    for field, call, extra in (  # the prompt's own errors name the field that carried it
        ("prompt", client.completions.create, dict(prompt=[[1, 2, 10**8]])),
        ("prompt", client.completions.create, dict(prompt=[[1] * 100_000])),
        ("messages", client.chat.completions.create, dict(messages=_chat("x " * 100_000))),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            call(model=model, max_tokens=2, **extra)
        assert err.value.body["param"] == field, err.value.body
    with pytest.raises(openai.NotFoundError):
        client.get("/no-such-route", cast_to=object)
    with openai.OpenAI(base_url=up.http, api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"model": "m", "prompt": "x", "temperature": NaN}',
        b'{"model": "m", "prompt": "x", "temperature": Infinity}',
        b"",
    ],
)
def test_bad_bodies_are_400(up, model, body):
    body = body.replace(b'"m"', json.dumps(model).encode())
    request = urllib.request.Request(
        f"{up.http}/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"


def test_grpc_honours_stop_and_logprobs(up, client, model):
    """The same sampling model over gRPC: stop strings cut the text, logprobs come with each token."""
    http = client.completions.create(
        model=model,
        prompt=PROMPTS[3],
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    with grpc.insecure_channel(up.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        sampling = gateway_pb2.SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2)
        replies = list(
            stub.Generate(
                gateway_pb2.GenerateRequest(token_ids=PROMPTS[3], sampling=sampling),
                metadata=[("authorization", f"Bearer {KEY}")],
                timeout=60,
            )
        )
        tokens = [t for r in replies for t in r.token_ids]
        logprobs = [lp.logprob for r in replies for lp in r.logprobs]
        assert tokens == http.token_ids and "".join(r.text for r in replies) == http.text
        assert logprobs == pytest.approx(http.logprobs.token_logprobs, abs=1e-6)
        stop = next(
            http.text[i : i + 2]
            for i in range(2, len(http.text) - 2)
            if http.text.find(http.text[i : i + 2]) == i and http.text[i : i + 2].strip()
        )
        cut = http.text.find(stop)
        sampling = gateway_pb2.SamplingParams(max_tokens=10, ignore_eos=True, stop=[stop])
        replies = list(
            stub.Generate(
                gateway_pb2.GenerateRequest(token_ids=PROMPTS[3], sampling=sampling),
                metadata=[("authorization", f"Bearer {KEY}")],
                timeout=60,
            )
        )
        assert "".join(r.text for r in replies) == http.text[:cut] and replies[-1].finish_reason == "stop"


def test_stopping_drains_running_streams_and_refuses_new_calls(up, client, model):
    """Last in the module: it stops the deployment. SIGTERM: /health turns 503, a new call is refused with 503,
    a stream already running still finishes (within the drain time), then everything stops."""
    stream = client.chat.completions.create(
        model=model,
        messages=_chat("long"),
        max_tokens=300,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [next(stream), next(stream)]  # the role, then a first token: running
    root = up.http.removesuffix("/v1")
    assert up.metric("gateway", "num_requests_running") == 1
    up.proc.send_signal(signal.SIGTERM)

    def health_refused() -> bool:
        try:
            urllib.request.urlopen(f"{root}/health", timeout=5)
            return False
        except urllib.error.HTTPError as err:
            return err.code == 503

    wait_until(health_refused, 30, "the gateway's /health to turn 503 on SIGTERM")
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=model, prompt="x", max_tokens=2)
    assert err.value.status_code == 503
    chunks += list(stream)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 300
    assert up.stop(timeout=60) == 0
