import pytest

from llmpost.model import tiny_qwen3
from llmpost.tasks import vocabulary_words
from llmpost.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def word_tokenizer():
    return train_tokenizer([" ".join(vocabulary_words())])


def make_tiny_model(tokenizer, seed=0, hidden=32):
    return tiny_qwen3(len(tokenizer), hidden_size=hidden, num_layers=2, num_heads=2,
                      num_kv_heads=1, intermediate_size=64, max_positions=128,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      seed=seed)
