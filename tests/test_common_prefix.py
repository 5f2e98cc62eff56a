"""The prompt's tokens on the host path: common_prefix_len (how many leading tokens two
prompts share: the typing cache and the scheduler's riding prompts ask it of every
keystroke's prompt) and check_prefill (any sequence of ids into a list of ints)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from codecomplete.runtime.base import common_prefix_len


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=120), st.lists(st.integers(0, 3), max_size=120),
       st.integers(0, 120), st.sampled_from(["list", "tuple", "array"]))
def test_common_prefix_len_is_the_first_difference(a, tail, shared, kind):
    """Against a plain walk: prompts sharing any prefix (the typing case: all but a few last
    tokens), none, one a prefix of the other; lists, tuples or arrays."""
    b = a[:shared] + tail
    expect = 0
    while expect < min(len(a), len(b)) and a[expect] == b[expect]:
        expect += 1
    wrap = {"list": list, "tuple": tuple, "array": np.array}[kind]
    assert common_prefix_len(wrap(a), wrap(b)) == expect == common_prefix_len(wrap(b), wrap(a))


def test_long_prompts_one_keystroke_apart():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 150_000, 1500).tolist()
    assert common_prefix_len(a, a[:-3] + [1, 2, 3]) == 1497
    assert common_prefix_len(a, a + [5]) == 1500
    assert common_prefix_len(a, [a[0] + 1] + a[1:]) == 0
    assert common_prefix_len(a, a[:700] + [a[700] + 1] + a[701:]) == 700
    assert common_prefix_len([], a) == 0


def test_a_prompt_is_checked_into_a_list_of_ints():
    """check_prefill: any sequence of ids becomes a list of Python ints; empty and non-flat
    prompts are clear errors."""
    from types import SimpleNamespace

    import pytest

    from codecomplete.runtime.base import Runtime

    rt = SimpleNamespace(config=SimpleNamespace(max_seq_len=100))
    rt.check_prefill = lambda tokens: Runtime.check_prefill(rt, tokens)
    for prompt in ([5, 6, 7], (5, 6, 7), np.array([5, 6, 7], dtype=np.int32), [np.int64(5), 6.0, True + 6]):
        out = rt.check_prefill(prompt)
        assert out == [5, 6, 7] and all(type(t) is int for t in out)
    with pytest.raises(ValueError, match="at least one token"):
        rt.check_prefill([])
    with pytest.raises(ValueError, match="shape"):
        rt.check_prefill(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="exceeds the model context"):
        rt.check_prefill(list(range(101)))
