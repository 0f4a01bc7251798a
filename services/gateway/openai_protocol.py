"""The OpenAI API's request bodies as pydantic models: /v1/completions and /v1/chat/completions, with vLLM's
extensions (`top_k`, `stop_token_ids`, `ignore_eos`, `return_token_ids`, `cache_salt`).

Only the shape is checked here (types, required fields); values are checked where every front end checks
them (SamplingParams.validate, the serving core). Fields clients commonly send but the server cannot honour
are refused by name when set to anything but their no-op value, instead of being silently ignored; unknown
fields are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.http_errors import ParamError
from services.gateway.sampling import MAX_LOGPROBS

MAX_N = 128  # choices per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self, index: int) -> dict[str, Any]:
        """The message as a chat template reads it: content as one string ("developer" is a system message)."""
        content = self.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text" or p.text is None]
            if bad:
                raise ParamError(
                    f"messages[{index}]: only text content parts are supported, got {bad[0]!r}",
                    f"messages.{index}.content",
                )
            content = "\n".join(p.text for p in content)
        if content is None and self.role != "assistant":
            raise ParamError(
                f"messages[{index}]: content is required for role {self.role!r}", f"messages.{index}.content"
            )
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    cache_salt: str | None = None  # vLLM's: only requests with the same salt share prefix-cache blocks
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise ParamError(f"n must lie in [1, {MAX_N}], got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options is only allowed with stream: true", "stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ParamError(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise ParamError("logit_bias is not supported", "logit_bias")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise ParamError("stop_token_ids must be token ids (>= 0)", "stop_token_ids")
        if self.cache_salt is not None and not self.cache_salt:
            raise ParamError("cache_salt must be a non-empty string", "cache_salt")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise ParamError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of is not supported (only equal to n)", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens 0 is only allowed with echo: true (scoring the prompt)", "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each as text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ParamError("the prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:  # sampling's `logprobs`
            raise ParamError(f"top_logprobs must lie in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", "top_logprobs")
        if self.tools:
            raise ParamError("tools are not supported", "tools")
        if self.tool_choice not in (None, "none"):
            raise ParamError("tool_choice is not supported", "tool_choice")
        if self.response_format and self.response_format.get("type") != "text":
            raise ParamError("response_format is not supported (only type text)", "response_format")

    @property
    def sampled_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
