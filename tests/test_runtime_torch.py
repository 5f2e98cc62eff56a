"""The torch runtime behind the seam: prefill reuse, N branches, int8 CPU weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from branch_decode import together_and_alone  # noqa: E402

from codecomplete.models.format.source import load_model_source  # noqa: E402
from codecomplete.runtime import load_runtime  # noqa: E402

TEXTS = [
    "def print_values(values):\n    for value in values:\n        print(value)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "int main(void) {\n    printf(\"hello\");\n    return 0;\n}\n",
    "function add(a, b) {\n    return a + b;\n}\nimport os\nimport sys\n",
]


def test_prefill_reuses_common_prefix_and_matches_fresh(tiny_model_dir):
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    tokens = rt.tokenizer.encode(TEXTS[0] + TEXTS[1])
    first, _ = rt.prefill(tokens[:30])
    again, logits = rt.prefill(tokens, first)
    assert again.reused_tokens == 30 and again.new_tokens == len(tokens) - 30
    _, fresh = rt.prefill(tokens)
    np.testing.assert_allclose(logits, fresh, atol=1e-4)


def test_prefill_of_identical_prompt_recomputes_only_the_last_token(tiny_model_dir):
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    tokens = rt.tokenizer.encode(TEXTS[2])
    state, logits = rt.prefill(tokens)
    state2, logits2 = rt.prefill(tokens, state)
    assert state2.new_tokens == 1
    np.testing.assert_allclose(logits, logits2, atol=1e-4)


def test_n_branch_decode_equals_separate_single_branch_decodes(tiny_gqa_model_dir):
    together, alone = together_and_alone(load_runtime(str(tiny_gqa_model_dir), runtime="torch"))
    for b, single in enumerate(alone):
        np.testing.assert_allclose(together[b], single, atol=1e-4)


def test_select_branches_keeps_the_right_caches(tiny_model_dir):
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    state, _ = rt.prefill(rt.tokenizer.encode(TEXTS[1]))
    br = rt.start_branches(state, 3, 8)
    rt.decode(state, br, [5, 6, 7])
    full = rt.decode(state, br, [8, 9, 10])
    br2 = rt.start_branches(state, 3, 8)
    rt.decode(state, br2, [5, 6, 7])
    kept = rt.select_branches(br2, [2, 0])
    part = rt.decode(state, kept, [10, 8])
    np.testing.assert_allclose(part, full[[2, 0]], atol=1e-4)


def test_prompt_longer_than_context_is_a_clear_error(tiny_model_dir):
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    with pytest.raises(ValueError, match="exceeds the model context"):
        rt.prefill([5] * (rt.config.max_seq_len + 1))


def test_int8_cpu_weights_keep_fp32_top1(tiny_model_dir):
    source = load_model_source(str(tiny_model_dir))
    fp32 = load_runtime(source=source, runtime="torch", precision="fp32")
    int8 = load_runtime(source=source, runtime="torch", precision="int8")
    agree = total = 0
    for text in TEXTS:
        tokens = fp32.tokenizer.encode(text)
        for end in range(2, len(tokens) + 1):
            _, a = fp32.prefill(tokens[:end])
            _, b = int8.prefill(tokens[:end])
            agree += int(a.argmax() == b.argmax())
            total += 1
    assert total > 50
    assert agree / total >= 0.98


@pytest.mark.parametrize("attention", ["bifurcated-einsum", "plain"])
def test_every_attention_mode_gives_the_same_logits(tiny_gqa_model_dir, attention):
    from codecomplete.bench.reference import torch_runtime
    from codecomplete.models.format.source import load_model_source
    from codecomplete.runtime.torch import TorchRuntime

    source = load_model_source(str(tiny_gqa_model_dir))
    ref, other = TorchRuntime(source), torch_runtime(attention, source)
    tokens = ref.tokenizer.encode(TEXTS[0])
    outs = []
    for rt in (ref, other):
        state, _ = rt.prefill(tokens)
        br = rt.start_branches(state, 3, 4)
        rt.decode(state, br, [5, 6, 7])
        br = rt.select_branches(br, [2, 0])
        outs.append(rt.decode(state, br, [8, 9]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_int8_cpu_weights_of_a_factorized_embedding_keep_fp32_top1(tmp_path):
    """The torch int8 path quantizes the layers and keeps the factorized table's projection
    float (embed() multiplies by it as a matrix)."""
    from codecomplete.models.testing import make_test_model

    make_test_model(tmp_path, embed_rank=16, n_kv_heads=2, int8=False, seed=5)
    source = load_model_source(str(tmp_path))
    fp32 = load_runtime(source=source, runtime="torch", precision="fp32")
    int8 = load_runtime(source=source, runtime="torch", precision="int8")
    assert int8.model.embed_proj.weight.dtype == torch.float32
    tokens = fp32.tokenizer.encode(TEXTS[0] + TEXTS[1])
    _, a = fp32.prefill(tokens)
    _, b = int8.prefill(tokens)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
