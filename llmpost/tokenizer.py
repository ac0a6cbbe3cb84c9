"""A small local tokenizer trained with `tokenizers`, wrapped as a transformers tokenizer.

The demo and tests need a tokenizer without a model hub: `train_tokenizer` builds a
word-level (default) or byte-level BPE vocabulary from texts, adds the chat special
tokens and a ChatML-like chat template, and returns a `PreTrainedTokenizerFast` that
`save_pretrained` / `load_tokenizer` round-trip. A real run loads its model's own
tokenizer directory with `load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, IM_START, IM_END = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, IM_START, IM_END]

# Whitespace-separated so that a word-level vocabulary sees whole words.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], kind: str = "word", vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a word-level or byte-level BPE tokenizer on `texts` (chat roles included)."""
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise ValueError(f"tokenizer kind must be 'word' or 'bpe', got {kind!r}")
    roles = ["system user assistant"]
    tok.train_from_iterator(list(texts) + roles, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer directory (the demo's, or a real model's); pad defaults to eos."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
