"""The tokenizer: a byte-level BPE in `tokenizer.json` (the `tokenizers` library's format, as DeepSeek ships).

`build_tokenizer` trains one on a fixed built-in corpus, deterministically, for models made by init-model, with
DeepSeek-V3's special tokens: BOS and EOS first (ids 0 and 1), the chat markers `<｜User｜>` and `<｜Assistant｜>`
last (single ids, within the vocabulary). `write_tokenizer` also writes `tokenizer_config.json` with a chat
template in DeepSeek-V3's style (what the OpenAI-compatible chat API renders).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from services.errors import ExpertmeshError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
CHAT_MARKERS = (USER_TOKEN, ASSISTANT_TOKEN)

# DeepSeek-V3's conversation format: BOS, the system prompts, then each user turn after <｜User｜> and each
# assistant turn after <｜Assistant｜>, closed by EOS; the generation prompt is a bare <｜Assistant｜>.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + (message['content'] if ns.system == '' else '\\n\\n' + message['content']) %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + (message['content'] or '') + eos_token }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('only system, user and assistant messages are supported, got ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few experts.
Experts are deployed as independent services and scaled by their load. The gateway runs attention.
Multi-head latent attention caches a compressed latent vector per token. Inference engines batch requests.
Tokens flow from the client to the gateway, through every layer, to the expert pools and back again.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 2026. Code: def forward(self, x): return x + 1
Hello, world! How are you today? The weather is fine, and the model is serving requests quickly.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # room left for the chat markers, added after the merges (as DeepSeek's are)
        vocab_size=vocab_size - len(CHAT_MARKERS),
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_MARKERS])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, bos_id)])
    return tok


def write_tokenizer(directory: str | Path, vocab_size: int, max_length: int) -> Tokenizer:
    tok = build_tokenizer(vocab_size)
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    special = [BOS_TOKEN, EOS_TOKEN, *CHAT_MARKERS]
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "model_max_length": max_length,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False,
                "added_tokens_decoder": {
                    str(tok.token_to_id(t)): {
                        "content": t,
                        "lstrip": False,
                        "normalized": False,
                        "rstrip": False,
                        "single_word": False,
                        "special": True,
                    }
                    for t in special
                },
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    return tok


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The model's tokenizer.json (None when it has none); one that does not load raises CheckpointError."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise TokenizerError(f"{path}: does not load as a Hugging Face tokenizer: {exc}") from None


class TokenizerError(ExpertmeshError):
    """A model's tokenizer.json that does not load. Names the file."""
