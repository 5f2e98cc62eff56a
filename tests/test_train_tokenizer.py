"""The shipped tokenizer: fixed special ids, exact byte-level round trips, code-shaped tokens."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from codecomplete.models.train.tokenizer import (
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    special_ids,
    train_tokenizer,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "default" / "tokenizer.json"
TRICKY = [
    "def f(x):\n\treturn x  # tab\r\n",
    "naïve café — “quotes” 日本語 😀👍🏽\n",
    "  leading spaces and trailing   \n\n\n    \t \r\n",
    "x = '\\u00e9' + \"\\n\"\0null\x7f",
    "<|endoftext|> is text here",
    "",
    " ",
    "\r",
]


@pytest.fixture(scope="module")
def shipped():
    return Tokenizer.from_file(str(SHIPPED))


def test_shipped_tokenizer_has_the_fixed_special_ids(shipped):
    assert special_ids(shipped) == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert shipped.get_vocab_size() == VOCAB_SIZE


def test_shipped_tokenizer_round_trips_tricky_text(shipped):
    for text in TRICKY:
        ids = shipped.encode(text, add_special_tokens=False).ids
        assert shipped.decode(ids, skip_special_tokens=False) == text, repr(text)


def test_special_token_text_encodes_to_its_id(shipped):
    assert shipped.encode("<|fim_prefix|>x<|fim_middle|>").ids[0] == 1


def test_indentation_and_python_keywords_are_single_tokens(shipped):
    for piece in ("    ", "        ", "\n    ", "\n        ", "def", " self", "):", '"""', "return"):
        assert len(shipped.encode(piece).ids) == 1, repr(piece)
    assert len(shipped.encode("):\n").ids) <= 2


def test_a_freshly_trained_tokenizer_round_trips_and_keeps_special_ids():
    tok = train_tokenizer(iter(TRICKY * 20 + ["def foo(self):\n    pass\n"] * 50), vocab_size=300)
    assert special_ids(tok) == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    for text in TRICKY:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
