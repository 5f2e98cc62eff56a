"""Runtime.decode_many: one batched step for several requests equals each request's own
decode (fp32 CPU, random tiny models, random mixes of contexts, branch counts and steps,
after select_branches / adopt / branch_from); chunked prefill equals a whole one."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from codecomplete.bench.decode import batched_against_alone as run_batched_and_alone  # noqa: E402
from codecomplete.models.format.config import ModelConfig  # noqa: E402
from codecomplete.models.model import Transformer  # noqa: E402
from codecomplete.runtime.base import DecodeStep, Runtime  # noqa: E402
from codecomplete.runtime.torch import TorchRuntime  # noqa: E402


def random_runtime(seed: int, kv_heads: int, bias: bool, **kwargs) -> TorchRuntime:
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, ffn_dim=96,
                      max_seq_len=256, qkv_bias=bias, tie_embeddings=seed % 2 == 0)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return TorchRuntime.from_model(model, **kwargs)


@pytest.mark.parametrize("seed,kv_heads,bias", [(0, 4, False), (1, 2, True), (2, 1, False), (3, 2, False)])
def test_decode_many_equals_each_request_decoded_alone(seed, kv_heads, bias):
    rt = random_runtime(seed, kv_heads, bias)
    checked = 0
    for out, ref in run_batched_and_alone(rt, rt, seed, count=6, steps=6):
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 12


def test_plain_batch_attention_gives_the_bifurcated_logits():
    bifurcated = random_runtime(5, 2, True)
    plain = TorchRuntime.from_model(bifurcated.model, batch_attention="plain")
    assert plain.batch_attention == "plain"
    for out, ref in run_batched_and_alone(plain, bifurcated, 5, count=5, steps=5):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_the_base_fallback_decodes_one_request_after_another():
    rt = random_runtime(6, 2, False)
    for out, ref in run_batched_and_alone(_Sequential(rt), rt, 6, count=4, steps=4):
        np.testing.assert_array_equal(out, ref)


class _Sequential(Runtime):
    """A runtime with only the base class's decode_many, over a torch runtime's calls."""

    def __init__(self, rt):
        self.rt, self.config = rt, rt.config

    def prefill(self, tokens, previous=None, *, capacity_tokens=None):
        return self.rt.prefill(tokens, previous, capacity_tokens=capacity_tokens)

    def start_branches(self, context, n, max_new_tokens):
        return self.rt.start_branches(context, n, max_new_tokens)

    def decode(self, context, branches, next_tokens):
        return self.rt.decode(context, branches, next_tokens)

    def select_branches(self, branches, keep):
        return self.rt.select_branches(branches, keep)

    def adopt(self, *args, **kwargs):
        return self.rt.adopt(*args, **kwargs)

    def branch_from(self, *args, **kwargs):
        return self.rt.branch_from(*args, **kwargs)


def test_decode_many_rejects_the_same_branches_twice_and_full_caches():
    rt = random_runtime(7, 2, False)
    state, _ = rt.prefill([1, 2, 3])
    branches = rt.start_branches(state, 2, 1)
    with pytest.raises(ValueError, match="same branches twice"):
        rt.decode_many([DecodeStep(state, branches, [1, 2]), DecodeStep(state, branches, [3, 4])])
    assert branches.step == 0
    rt.decode_many([DecodeStep(state, branches, [1, 2])])
    with pytest.raises(ValueError, match="full"):
        rt.decode_many([DecodeStep(state, branches, [1, 2])])
    with pytest.raises(ValueError, match="2 branches"):
        rt.decode_many([DecodeStep(state, rt.start_branches(state, 2, 4), [1])])
    assert rt.decode_many([]) == []


def test_chunked_prefill_keeps_the_first_chunks_cache_and_equals_a_whole_prefill():
    rt = random_runtime(8, 2, True)
    tokens = np.random.default_rng(8).integers(0, rt.config.vocab_size, 200).tolist()
    state, _ = rt.prefill(tokens[:64], capacity_tokens=len(tokens))
    buffer, done = state.kv[0].data_ptr(), 64
    for end in (128, 190, 200):
        state, logits = rt.prefill(tokens[:end], state)
        assert state.kv[0].data_ptr() == buffer and state.reused_tokens == done and state.new_tokens == end - done
        done = end
    assert state.kv[0].shape[2] >= len(tokens)
    whole, whole_logits = rt.prefill(tokens)
    np.testing.assert_allclose(logits, whole_logits, rtol=1e-4, atol=1e-4)
    a, b = rt.start_branches(state, 2, 4), rt.start_branches(whole, 2, 4)
    for step_tokens in ([3, 4], [5, 6], [7, 8]):
        np.testing.assert_allclose(rt.decode(state, a, step_tokens), rt.decode(whole, b, step_tokens),
                                   rtol=1e-4, atol=1e-4)
