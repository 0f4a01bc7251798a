"""The pieces of the OpenAI-compatible API that need no deployment: SamplingParams' new fields, the chat template
as init-model writes it, generation_config.json defaults, token texts of logprobs, per-token logprobs from the
runner, the error mapping, and the HTTP app's errors before a model is attached (real FastAPI, in process)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient

from services.errors import (
    CacheFullError,
    InvalidRequestError,
    PoolUnavailableError,
    QueueFullError,
    ServerStoppingError,
)
from services.format.generation_config import GenerationConfigError, read_generation_defaults
from services.format.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    USER_TOKEN,
    build_tokenizer,
    write_tokenizer,
)
from services.gateway.chat_template import ChatTemplate
from services.gateway.http_app import HttpFrontEnd
from services.gateway.http_errors import AuthenticationError, ParamError, RouteNotFoundError, error_body
from services.gateway.openai_output import TokenTexts
from services.gateway.openai_serving import OpenAIServing
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams

# ---- SamplingParams ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(stop=("a", "b", "c", "d", "e")), "at most 4"),
        (dict(stop=("",)), "non-empty"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(temperature=math.nan), "temperature"),
    ],
)
def test_sampling_params_refuse_bad_new_fields(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(max_tokens=4, **fields).validate(100)


def test_sampling_params_accept_the_limits():
    SamplingParams(max_tokens=4, stop=("a", "b", "c", "d"), logprobs=20, seed=2**64 - 1).validate(100)
    SamplingParams(max_tokens=4, logprobs=0).validate(100)


# ---- chat template --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tok = write_tokenizer(directory, 1024, 4096)
    return directory, tok


def test_chat_template_renders_deepseek_v3_turns(model_files):
    directory, tok = model_files
    template = ChatTemplate.from_dir(directory)
    text = template.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "中文?"},
        ]
    )
    assert text == (
        f"{BOS_TOKEN}Be brief.{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello{EOS_TOKEN}{USER_TOKEN}中文?{ASSISTANT_TOKEN}"
    )
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id(BOS_TOKEN) and ids.count(tok.token_to_id(BOS_TOKEN)) == 1
    assert tok.token_to_id(USER_TOKEN) in ids and ids[-1] == tok.token_to_id(ASSISTANT_TOKEN)
    no_prompt = template.render([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert no_prompt == f"{BOS_TOKEN}{USER_TOKEN}x"


def test_chat_template_refusals_are_invalid_requests(model_files):
    template = ChatTemplate.from_dir(model_files[0])
    with pytest.raises(InvalidRequestError, match="only system, user and assistant"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])  # the sandbox refuses
    assert ChatTemplate("{{ 'a' | tojson }}").render([]) == '"a"'


def test_chat_markers_are_single_special_ids_within_the_vocabulary():
    for vocab in (512, 1024, 16384):
        tok = build_tokenizer(vocab)
        assert tok.get_vocab_size() <= vocab
        ids = [tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)]
        assert ids[:2] == [0, 1] and all(i is not None and i < vocab for i in ids)
        assert tok.encode(f"a{USER_TOKEN}b", add_special_tokens=False).ids[1] == ids[2]
        assert tok.decode(tok.encode(f"a{ASSISTANT_TOKEN}b").ids, skip_special_tokens=True) == "ab"


def test_a_model_without_template_has_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert ChatTemplate.from_dir(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>x"


# ---- generation_config.json ------------------------------------------------------------------------------


def test_generation_defaults(tmp_path):
    assert read_generation_defaults(tmp_path).temperature is None
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "do_sample": True}))
    d = read_generation_defaults(tmp_path)
    assert (d.temperature, d.top_p, d.top_k) == (0.6, 0.95, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 2}))
    with pytest.raises(GenerationConfigError, match="top_p"):
        read_generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(GenerationConfigError, match="JSON"):
        read_generation_defaults(tmp_path)


# ---- logprob texts and values -----------------------------------------------------------------------


def test_token_texts_are_the_tokens_bytes():
    tok = build_tokenizer(512)
    texts = TokenTexts(tok)
    for token_id in range(tok.get_vocab_size()):
        text, raw = texts.get(token_id)
        if token_id in (tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)):
            assert text == tok.id_to_token(token_id)
            continue
        assert text == raw.decode("utf-8", errors="replace")
        assert text == tok.decode([token_id]) or "\ufffd" in text
    ids = tok.encode("naïve 中文").ids[1:]
    assert b"".join(texts.get(t)[1] for t in ids).decode() == "naïve 中文"


def test_runner_logprobs_are_the_models(engine_tiny):
    """The logprob of each sampled token and the top alternatives come from the logits row it was sampled
    from: they equal a score of prompt + output at the same positions."""
    core = engine_tiny.core
    prompt = [5, 17, 300, 42, 7]
    for params in (
        SamplingParams(max_tokens=6, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=6, logprobs=0, temperature=0.8, seed=3, ignore_eos=True),
    ):
        req = Request(list(prompt), params)
        core.submit(req)
        core.run_until_idle()
        assert len(req.token_logprobs) == len(req.output) == 6
        scores = engine_tiny.score(prompt + req.output, top_k=3)[len(prompt) :]
        for (logprob, top), s, token in zip(req.token_logprobs, scores, req.output):
            assert s.token_id == token and logprob == pytest.approx(s.logprob, abs=1e-4)
            assert len(top) == params.logprobs
            if params.logprobs:
                assert [t for t, _ in top] == [t for t, _ in s.top]
                assert torch.allclose(torch.tensor([v for _, v in top]), torch.tensor([v for _, v in s.top]), atol=1e-4)
        if params.temperature == 0:  # greedy: every token is its position's best
            assert [top[0][0] for _, top in req.token_logprobs] == req.output


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc,status,kind",
    [
        (InvalidRequestError("bad"), 400, "invalid_request_error"),
        (ParamError("bad", "temperature"), 400, "invalid_request_error"),
        (AuthenticationError("key"), 401, "authentication_error"),
        (RouteNotFoundError("no"), 404, "not_found_error"),
        (QueueFullError("full"), 429, "rate_limit_error"),
        (CacheFullError("full"), 429, "rate_limit_error"),
        (ServerStoppingError("stopping"), 503, "service_unavailable_error"),
        (PoolUnavailableError("gateway", "still loading the model"), 503, "service_unavailable_error"),
        (RuntimeError("boom"), 500, "server_error"),
    ],
)
def test_error_mapping(exc, status, kind):
    got, body = error_body(exc)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == kind
    assert str(exc) in body["error"]["message"]
    if isinstance(exc, ParamError):
        assert body["error"]["param"] == "temperature"


@pytest.fixture
def loading_app():
    """The HTTP app of a gateway still loading its model, with an API key."""
    front = HttpFrontEnd(OpenAIServing("m"), "127.0.0.1", 0, api_keys=frozenset({"k1"}))
    front.sock.close()
    return TestClient(front.asgi, raise_server_exceptions=False), front


def test_http_errors_before_the_model_is_loaded(loading_app):
    client, front = loading_app
    auth = {"Authorization": "Bearer k1"}
    assert client.get("/health").status_code == 503
    front.serving_now = True
    assert client.get("/health").status_code == 200
    cases = [
        (client.get("/v1/models"), 401, "authentication_error"),
        (client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "authentication_error"),
        (client.get("/v1/models", headers=auth), 503, "service_unavailable_error"),
        (
            client.post("/v1/completions", headers=auth, json={"model": "m", "prompt": "x"}),
            503,
            "service_unavailable_error",
        ),
        (client.post("/v1/completions", headers=auth, content=b"{not json"), 400, "invalid_request_error"),
        (
            client.post("/v1/completions", headers=auth, json={"model": "m", "prompt": "x", "temperature": "hot"}),
            400,
            "invalid_request_error",
        ),
        (client.post("/v1/completions", headers=auth, json=[1, 2]), 400, "invalid_request_error"),
        (
            client.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": []}),
            400,
            "invalid_request_error",
        ),
        (client.post("/v1/chat/completions", headers=auth, json={"model": "m"}), 400, "invalid_request_error"),
        (client.get("/v1/nope", headers=auth), 404, "not_found_error"),
        (client.get("/v1/completions", headers=auth), 405, "invalid_request_error"),
    ]
    for response, status, kind in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["type"] == kind, response.text
    bad_type = client.post("/v1/completions", headers=auth, json={"model": "m", "prompt": "x", "temperature": "hot"})
    assert bad_type.json()["error"]["param"] == "temperature"
    assert client.get("/metrics").status_code == 200  # open, as /health


def test_http_refuses_new_calls_while_stopping(loading_app):
    client, front = loading_app
    front.serving_now, front.stopping = True, True
    assert client.get("/health").status_code == 503
    response = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_stopping"


def test_a_full_queue_is_429(tiny_fp8):
    """A real gateway in process (gRPC and HTTP servers, two pools) taking one running and one waiting request:
    the next call is refused with 429 (openai.RateLimitError), and the others are still served."""
    import openai

    from tests.inprocess_deployment import InProcessDeployment
    from tests.waiting import wait_until

    dep = InProcessDeployment(tiny_fp8, "fp32", http_port=0, max_running=1, max_waiting=1)
    try:
        sched = dep.runtime.core.scheduler
        client = openai.OpenAI(base_url=f"http://{dep.runtime.http.address}/v1", api_key="x", max_retries=0)
        kwargs = dict(
            model=tiny_fp8.name,
            prompt="Hello",
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        running = client.completions.create(**kwargs)
        next(running)
        waiting = client.completions.create(**kwargs)  # the response starts once it is submitted
        wait_until(lambda: sched.num_waiting == 1, 30, "a request waiting for admission")
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(**{**kwargs, "stream": False})
        assert err.value.status_code == 429 and "--max-waiting" in err.value.message
        running.close()
        assert sum(1 for _ in waiting) > 0
        client.close()
    finally:
        dep.close()


def test_http_defaults_come_from_generation_config_and_grpc_stays_greedy():
    from types import SimpleNamespace

    from expertmesh.v1 import gateway_pb2
    from services.format.generation_config import GenerationDefaults
    from services.gateway.grpc_servicer import sampling_params
    from services.gateway.openai_protocol import CompletionRequest

    serving = OpenAIServing("m", GenerationDefaults(temperature=0.6, top_p=0.95))
    serving._core = SimpleNamespace(max_context=100)
    p = serving._params(CompletionRequest(model="m", prompt="x"), None, 10, None, 0)
    assert (p.temperature, p.top_p, p.top_k, p.seed) == (0.6, 0.95, 0, None)
    assert p.max_tokens == 90  # the rest of the context
    body = CompletionRequest(model="m", prompt="x", temperature=0, top_k=-1, seed=5, stop="END")
    p = serving._params(body, 7, 10, 2, 1)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0, 0.95, 0, 7)
    assert (p.seed, p.logprobs, p.stop) == (6, 2, ("END",))
    with pytest.raises(ParamError, match="fills the context"):
        serving._params(CompletionRequest(model="m", prompt="x"), None, 100, None, 0)
    grpc_params = sampling_params(gateway_pb2.SamplingParams(max_tokens=4))
    assert (grpc_params.temperature, grpc_params.stop, grpc_params.logprobs) == (0.0, (), None)
