"""A tokenizer learned from the training corpus, for a trained model (the demo's).

init-model's tokenizer (services/format/tokenizer.py) learns its merges from a few built-in sentences: on Python
source it is almost byte by byte (1.3 characters per token, indentation one token per space), so a small model
trained on it spends its context and its greedy choices on spaces. This one is the same byte-level BPE with the
same special tokens in the same places (BOS 0 and EOS 1 first, the chat markers last, BOS prepended), its merges
learned from the corpus (about 3 characters per token on the standard library's source).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from services.format.tokenizer import BOS_TOKEN, CHAT_MARKERS, EOS_TOKEN


def corpus_tokenizer(vocab_size: int, texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_MARKERS),  # room for the chat markers, added after the merges
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_MARKERS])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, bos_id)])
    return tok


def replace_tokenizer(directory: str | Path, vocab_size: int, texts: list[str]) -> Tokenizer:
    """Replace a model directory's tokenizer.json (as init-model writes it) with one learned from `texts`;
    tokenizer_config.json's special-token ids follow (its chat template and settings stay)."""
    directory = Path(directory)
    tok = corpus_tokenizer(vocab_size, texts)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens, more than the model's {vocab_size}")
    tok.save(str(directory / "tokenizer.json"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    specials = config.get("added_tokens_decoder", {}).values()
    config["added_tokens_decoder"] = {str(tok.token_to_id(entry["content"])): entry for entry in specials}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tok
