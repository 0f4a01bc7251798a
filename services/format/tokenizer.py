"""The tokenizer: a byte-level BPE in `tokenizer.json` (the `tokenizers` library's format, as DeepSeek ships).

`build_tokenizer` trains one on a fixed built-in corpus, deterministically, for models made by init-model.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"

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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, bos_id)])
    return tok


def write_tokenizer(directory: str | Path, vocab_size: int, max_length: int) -> Tokenizer:
    tok = build_tokenizer(vocab_size)
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
        "model_max_length": max_length, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return tok


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    path = Path(directory) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.exists() else None
