"""The OpenAI-compatible API over the serving core: /v1/models, /v1/completions, /v1/chat/completions.

A call is translated into SamplingParams (the request's values, else the checkpoint's generation_config.json
defaults, else OpenAI's), checked whole by the serving core before anything is submitted, then run as one
`ChoiceRun` (n requests per prompt, seeds seed+i). Streamed and non-streamed answers come from the same
updates, so the streamed pieces add up to the non-streamed text. Errors raise (http_errors maps them); once a
stream has started, an error is its last event before `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from services.errors import InvalidRequestError, PoolUnavailableError
from services.format.generation_config import GenerationDefaults
from services.gateway.chat_template import ChatTemplate
from services.gateway.http_errors import ParamError, error_body
from services.gateway.openai_output import (
    ChoiceOutput,
    Envelope,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    sse,
    usage,
)
from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from services.gateway.openai_runs import Choice, ChoiceRun, Update, finished
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams
from services.gateway.serving import ServingCore
from services.gateway.stop_strings import OutputText
from services.rpc.metrics import GatewayMetrics


@dataclass
class Streamed:
    """Server-sent events, and what ends their run (called however the response ends)."""

    events: AsyncIterator[str]
    close: Callable[[], None]


Answer = dict | Streamed  # a JSON body, or server-sent events


def _first(*values):
    return next(v for v in values if v is not None)


class OpenAIServing:
    def __init__(
        self,
        model_name: str,
        defaults: GenerationDefaults = GenerationDefaults(),
        chat_template: ChatTemplate | None = None,
        metrics: GatewayMetrics | None = None,
    ):
        self.model_name, self.defaults, self.chat_template, self.metrics = model_name, defaults, chat_template, metrics
        self._core: ServingCore | None = None
        self.texts = TokenTexts(None)

    def attach(self, core: ServingCore) -> None:
        self._core = core
        self.texts = TokenTexts(core.tokenizer)

    @property
    def core(self) -> ServingCore:
        if self._core is None:
            raise PoolUnavailableError("gateway", "still loading the model")
        return self._core

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "expertmesh",
                    "max_model_len": self.core.max_context,
                }
            ],
        }

    # ---- requests in --------------------------------------------------------------------------------
    def _check_model(self, body: SamplingFields) -> ServingCore:
        core = self.core
        body.check()
        if body.model != self.model_name:
            raise ParamError(
                f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        return core

    def _params(
        self, body: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: int | None, offset: int
    ) -> SamplingParams:
        d = self.defaults
        if max_tokens is None:  # the rest of the context
            max_tokens = self.core.max_context - prompt_len
            if max_tokens < 1:
                raise ParamError(
                    f"the prompt of {prompt_len} tokens fills the context of {self.core.max_context} tokens", "prompt"
                )
        top_k = _first(body.top_k, d.top_k, 0)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_first(body.temperature, d.temperature, 1.0),
            top_p=_first(body.top_p, d.top_p, 1.0),
            top_k=0 if top_k == -1 else top_k,  # vLLM's -1: no top-k cut
            seed=None if body.seed is None else body.seed + offset,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            stop=body.stop_strings,
            logprobs=logprobs,
        )

    def _choices(
        self,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        prompt_field: str,
    ) -> list[Choice]:
        """n choices per prompt, every one checked before any is submitted; an error of the prompt itself (empty, a
        token outside the vocabulary, too long for the context) names `prompt_field`."""
        choices = []
        for ids in prompts:
            for j in range(body.n):
                req = None
                if max_tokens != 0:
                    params = self._params(body, max_tokens, len(ids), logprobs, j)
                    try:
                        self.core.check_request(ids, params)
                    except InvalidRequestError as exc:
                        if exc.param is not None:  # a sampling parameter, named already
                            raise
                        raise InvalidRequestError(str(exc), prompt_field) from None
                    req = Request(ids, params, cache_salt=body.cache_salt)
                choices.append(Choice(len(choices), ids, req, OutputText(self.core.tokenizer, body.stop_strings)))
        return choices

    def _run(self, choices: list[Choice]) -> ChoiceRun:
        run = ChoiceRun(self.core, choices, self.metrics)
        run.start()
        return run

    # ---- /v1/completions ----------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest) -> Answer:
        core = self._check_model(body)
        given = body.prompts()
        prompts = [core.encode(p) if isinstance(p, str) else list(p) for p in given]
        choices = self._choices(body, prompts, body.max_tokens, body.logprobs, "prompt")
        if body.echo:
            await self._echo(body, given, prompts, choices)
        env = Envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), self.model_name)
        prompt_tokens = sum(len(p) for p in prompts)
        run = self._run(choices)
        if body.stream:
            return Streamed(self._completion_stream(env, run, body, prompt_tokens), run.cancel)
        outputs = await _collect(run)
        return env.body(
            [
                self._completion_choice(
                    body, o.index, o.text, o.logprobs, o.finish_reason, run.choices[o.index], o.token_ids, 0
                )
                for o in outputs
            ],
            usage=usage(prompt_tokens, run.completion_tokens, run.cached_tokens),
            system_fingerprint=None,
        )

    async def _echo(self, body: CompletionRequest, given: list, prompts: list[list[int]], choices: list[Choice]):
        """The prompt's text leads each choice; with logprobs, the prompt's own (a score of the prompt)."""
        scored: dict[int, list] = {}
        for i, ids in enumerate(prompts):
            if body.logprobs is not None:
                self.core.check_score(ids, body.logprobs)
                req = await finished(self.core, Request(ids, score_top_k=body.logprobs))
                scored[i] = [(s.token_id, s.logprob, s.top) for s in req.scores]
            text = given[i] if isinstance(given[i], str) else self.core.decode(ids)
            for choice in choices[i * body.n : (i + 1) * body.n]:
                choice.echo_text, choice.echo_logprobs = text, scored.get(i, [])
                choice.logprob_offset = len(text)

    def _completion_choice(
        self,
        body: CompletionRequest,
        index: int,
        text: str,
        entries: list,
        finish: str | None,
        choice: Choice,
        token_ids: list[int],
        offset: int | None = None,
    ) -> dict:
        out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if body.logprobs is not None:
            out["logprobs"] = completion_logprobs(
                self.texts, entries, choice.logprob_offset if offset is None else offset
            )
        if body.return_token_ids:
            out["token_ids"] = token_ids
            out["prompt_token_ids"] = choice.prompt
        return out

    async def _completion_stream(
        self, env: Envelope, run: ChoiceRun, body: CompletionRequest, prompt_tokens: int
    ) -> AsyncIterator[str]:
        extra = {"usage": None} if body.include_usage else {}
        try:
            if body.echo:
                for c in run.choices:
                    yield sse(
                        env.body(
                            [self._completion_choice(body, c.index, c.echo_text, c.echo_logprobs, None, c, [], 0)],
                            **extra,
                        )
                    )
            async for u in run.updates():
                if not (u.text or u.finish_reason or u.logprobs or (u.token_ids and body.return_token_ids)):
                    continue
                chunk = self._completion_choice(
                    body, u.choice.index, u.text, u.logprobs, u.finish_reason, u.choice, u.token_ids
                )
                u.choice.logprob_offset += sum(len(self.texts.text(t)) for t, _, _ in u.logprobs)
                yield sse(env.body([chunk], **extra))
            if body.include_usage:
                yield sse(env.body([], usage=usage(prompt_tokens, run.completion_tokens, run.cached_tokens)))
        except Exception as exc:  # noqa: BLE001 - the stream has started: the error is its last event
            yield sse(error_body(exc)[1])
        yield sse("[DONE]")

    # ---- /v1/chat/completions -----------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest) -> Answer:
        core = self._check_model(body)
        if self.chat_template is None or core.tokenizer is None:
            raise ParamError(
                "this model has no chat template (tokenizer_config.json chat_template): use /v1/completions",
                "messages",
                "no_chat_template",
            )
        messages = [m.as_template_input(i) for i, m in enumerate(body.messages)]
        prompt = core.tokenizer.encode(
            self.chat_template.render(messages, body.add_generation_prompt), add_special_tokens=False
        ).ids  # the template wrote the special tokens
        if body.new_tokens == 0:
            raise ParamError("max_tokens must be >= 1", "max_tokens")
        choices = self._choices(body, [prompt], body.new_tokens, body.sampled_logprobs, "messages")
        env = Envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", int(time.time()), self.model_name)
        run = self._run(choices)
        if body.stream:
            env.object = "chat.completion.chunk"
            return Streamed(self._chat_stream(env, run, body, len(prompt)), run.cancel)
        outputs = await _collect(run)
        return env.body(
            [self._chat_choice(body, o, {"role": "assistant", "content": o.text}, "message") for o in outputs],
            usage=usage(len(prompt), run.completion_tokens, run.cached_tokens),
            system_fingerprint=None,
        )

    def _chat_choice(self, body: ChatCompletionRequest, o: ChoiceOutput | Update, message: dict, key: str) -> dict:
        index = o.index if isinstance(o, ChoiceOutput) else o.choice.index
        out = {
            "index": index,
            key: message,
            "logprobs": chat_logprobs(self.texts, o.logprobs) if body.logprobs else None,
            "finish_reason": o.finish_reason,
        }
        if body.return_token_ids:
            out["token_ids"] = o.token_ids
            if isinstance(o, ChoiceOutput):
                out["prompt_token_ids"] = o.prompt_token_ids
        return out

    async def _chat_stream(
        self, env: Envelope, run: ChoiceRun, body: ChatCompletionRequest, prompt_tokens: int
    ) -> AsyncIterator[str]:
        extra = {"usage": None} if body.include_usage else {}
        try:
            for c in run.choices:
                yield sse(
                    env.body(
                        [
                            {
                                "index": c.index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                        **extra,
                    )
                )
            async for u in run.updates():
                if not (u.text or u.finish_reason or u.logprobs or (u.token_ids and body.return_token_ids)):
                    continue
                yield sse(
                    env.body([self._chat_choice(body, u, {"content": u.text} if u.text else {}, "delta")], **extra)
                )
            if body.include_usage:
                yield sse(env.body([], usage=usage(prompt_tokens, run.completion_tokens, run.cached_tokens)))
        except Exception as exc:  # noqa: BLE001 - the stream has started: the error is its last event
            yield sse(error_body(exc)[1])
        yield sse("[DONE]")


async def _collect(run: ChoiceRun) -> list[ChoiceOutput]:
    """A run's updates gathered per choice: what a non-streamed answer holds."""
    outputs = [
        ChoiceOutput(c.index, c.echo_text, [], list(c.echo_logprobs), prompt_token_ids=c.prompt) for c in run.choices
    ]
    async for u in run.updates():
        o = outputs[u.choice.index]
        o.text += u.text
        o.token_ids += u.token_ids
        o.logprobs += u.logprobs
        o.finish_reason = u.finish_reason
    return outputs
