"""Chat messages to a prompt: the checkpoint's `chat_template` (tokenizer_config.json, or chat_template.jinja),
rendered in jinja2's immutable sandbox the way transformers' `apply_chat_template` renders it: trim_blocks and
lstrip_blocks, the loop-controls extension, the variables `messages`, `bos_token`, `eos_token` and
`add_generation_prompt`, and the helpers `raise_exception`, `strftime_now` and a `tojson` filter.

The rendered text already holds the special tokens the template writes (BOS among them): it is tokenized
without adding them again.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.errors import InvalidRequestError

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str:
    """bos_token/eos_token as tokenizer_config.json spells them: a string or an AddedToken object."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The model's template, or None when it has none."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source and (directory / TEMPLATE_FILE).exists():
            source = (directory / TEMPLATE_FILE).read_text()
        if not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text; a message the template refuses (or cannot render) is an InvalidRequestError."""
        try:
            return self.template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"the chat template refused the messages: {exc}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise InvalidRequestError(f"the chat template could not render the messages: {exc}") from None
