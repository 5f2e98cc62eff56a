"""Token alignment: masks agree with a brute-force scan; back-off stops at sentinels."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from codecomplete.alignment import VocabTrie, advance, back_off, strip_constraint

ALPHABET = b"ab \n(x\xc3\xa9"  # includes a two-byte UTF-8 character split across tokens

vocab_strategy = st.lists(st.binary(min_size=0, max_size=5).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
                          min_size=1, max_size=60)


def brute_force(vocab, remaining):
    return [i for i, t in enumerate(vocab) if t and (t.startswith(remaining) or remaining.startswith(t))]


@settings(max_examples=200, deadline=None)
@given(vocab=vocab_strategy, remaining=st.binary(min_size=1, max_size=7).map(
    lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)))
def test_mask_matches_brute_force_scan(vocab, remaining):
    trie = VocabTrie(vocab)
    assert np.flatnonzero(trie.mask(remaining)).tolist() == brute_force(vocab, remaining)


def test_mask_is_cached_and_identical_on_second_call():
    trie = VocabTrie([b"a", b"ab", b"b"])
    first = trie.mask(b"ab")
    assert trie.mask(b"ab") is first


def test_real_tokenizer_masks_match_brute_force(tiny_model_dir):
    from codecomplete.models.format.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tiny_model_dir / "tokenizer.json")
    vocab = tok.token_bytes
    trie = VocabTrie(vocab)
    for remaining in [b" pri", b"self.", b"    ", b"\n    ", b"(", b"x = ", b"\xc3"]:
        assert np.flatnonzero(trie.mask(remaining)).tolist() == brute_force(vocab, remaining)


def test_back_off_removes_k_tokens_and_returns_their_text():
    vocab = [b"", b"def", b" pri", b"nt", b"(", b"x"]
    bo = back_off([1, 2, 3, 4], vocab, 3)
    assert bo.kept == [1] and bo.removed == b" print(" and bo.removed_tokens == 3


def test_back_off_stays_on_the_cursor_line():
    vocab = [b"", b'    """', b"\n", b"    ", b"\n    ", b"re", b"):\n"]
    # `    """\n    re|`: the docstring's closing quotes are not re-generated
    assert back_off([1, 2, 3, 5], vocab, 3).removed == b"    re"
    # a token holding the line break is the partial token itself: removed, then stop
    assert back_off([1, 4, 5], vocab, 3).removed == b"\n    re"
    # the cursor at a line start: the line break's token goes (it may merge with the indent)
    assert back_off([1, 6], vocab, 3).removed == b"):\n"
    # without the rule, k tokens whatever the lines
    assert back_off([1, 2, 3, 5], vocab, 3, within_line=False).removed == b"\n    re"


def test_back_off_never_crosses_a_special_token():
    vocab = [b"", b"a", b"b"]
    bo = back_off([1, 0, 2], vocab, 3, special_ids={0})
    assert bo.kept == [1, 0] and bo.removed == b"b"


def test_advance_and_strip_constraint():
    assert advance(b" print(", b" pri") == b"nt("
    assert advance(b"nt(", b"nt(x") == b""
    assert strip_constraint(b" print(x)", b" print(") == b"x)"


@settings(max_examples=200, deadline=None)
@given(vocab=vocab_strategy, text=st.binary(min_size=1, max_size=8).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)))
def test_extends_matches_brute_force(vocab, text):
    trie = VocabTrie(vocab)
    assert trie.extends(text) == any(t.startswith(text) and len(t) > len(text) for t in vocab)


@settings(max_examples=300, deadline=None)
@given(vocab=vocab_strategy, picks=st.lists(st.integers(0, 59), min_size=1, max_size=8), k=st.integers(1, 4))
def test_needed_back_off_reaches_the_earliest_possible_token_start_and_no_further(vocab, picks, k):
    vocab = [t for t in vocab if t] or [b"a"]
    prompt = [p % len(vocab) for p in picks]
    trie = VocabTrie(vocab)
    fixed = back_off(prompt, vocab, k, within_line=False)
    needed = back_off(prompt, vocab, k, within_line=False, trie=trie)
    assert needed.kept + prompt[len(needed.kept):] == prompt and needed.kept[: len(fixed.kept)] == fixed.kept
    assert fixed.removed.endswith(needed.removed) and needed.removed_tokens <= fixed.removed_tokens
    # no token can start in the part of the fixed span that stays in the prompt ...
    kept_part = fixed.removed[: len(fixed.removed) - len(needed.removed)]
    assert not any(trie.extends(fixed.removed[p:]) for p in range(len(kept_part)))
    # ... and the first removed token is needed: a token could start inside it
    if needed.removed_tokens:
        first = vocab[prompt[len(needed.kept)]]
        assert any(trie.extends(needed.removed[p:]) for p in range(len(first)))


def test_needed_back_off_keeps_whole_words_before_the_cursor_token():
    vocab = [b" result", b".", b"st", b"e", b"ste", b"steps", b" =", b" ", b" x", b"(", b"(self"]
    ids = {t: i for i, t in enumerate(vocab)}
    trie = VocabTrie(vocab)
    prompt = [ids[b" result"], ids[b"."], ids[b"st"], ids[b"e"]]
    assert back_off(prompt, vocab, 3).removed == b".ste"
    assert back_off(prompt, vocab, 3, trie=trie).removed == b"ste"  # "st"+"e" may become "steps"
    # nothing longer starts with the end of " x =": no back-off, no constrained steps
    assert back_off([ids[b" x"], ids[b" ="]], vocab, 3, trie=trie).removed_tokens == 0
    assert back_off([ids[b" x"], ids[b"("]], vocab, 3, trie=trie).removed == b"("


@settings(max_examples=200, deadline=None)
@given(vocab=vocab_strategy, remaining=st.binary(min_size=1, max_size=7).map(
    lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)))
def test_allowed_ids_are_the_brute_force_ids_ascending(vocab, remaining):
    assert VocabTrie(vocab).allowed_ids(remaining).tolist() == brute_force(vocab, remaining)


def test_allowed_ids_when_most_of_a_large_vocabulary_agrees():
    """A byte that most tokens begin with (a space in a BPE vocabulary; "<" in the stand-in
    one's placeholders): through a mask of the vocabulary, the same ascending ids as a
    scan. (np.unique took 40-100 ms for 150k ids here.)"""
    rng = np.random.default_rng(0)
    vocab = [b"<|p%d|>" % i if rng.random() < 0.9 else bytes([97 + i % 26]) for i in range(30_000)]
    vocab[7] = b"<"
    trie = VocabTrie(vocab)
    for remaining in (b"<", b"<|p1", b"a"):
        assert trie.allowed_ids(remaining).tolist() == brute_force(vocab, remaining)
