"""GGUF Q8_0 and Q5_0 tensors are kept as blockwise int8 (their own codes and a scale per
block of 32) and run as onnxruntime MatMulNBits 8-bit: the stored weights are exactly the
file's dequantized values, where int8 per channel re-rounded them."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_gguf_import as gguf_files  # noqa: E402  (tests/ is on sys.path under pytest)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from test_gguf_4bit import logit_errors  # noqa: E402

from codecomplete.models.format.folder import dequantize, int8_dequantized, split_int8  # noqa: E402
from codecomplete.models.format.gguf_import import (  # noqa: E402
    load_gguf,
    q5_0_as_blockwise,
    q8_0_as_blockwise,
)
from codecomplete.runtime import onnx_graph  # noqa: E402
from codecomplete.runtime.onnx import OnnxRuntime  # noqa: E402
from codecomplete.runtime.onnx_graph import EmbeddingTable, GraphBuilder, LinearWeight, stack_rows  # noqa: E402


def qwen_like_type(name: str) -> Q:
    """The mix llama.cpp wrote for Qwen2.5-Coder-0.5B Q4_K_M: Q5_0 and Q8_0 almost everywhere."""
    if name.endswith(".bias") or "norm" in name:
        return Q.F32
    if name.endswith("ffn_down.weight"):
        return Q.Q6_K
    if name.endswith(("attn_v.weight", "output.weight")):
        return Q.Q8_0
    return Q.Q5_0


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODECOMPLETE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def qwen_like_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-q5")
    return gguf_files.write_gguf(folder / "tiny-q5.gguf", "qwen2", False, "qwen2", seed=7, pick=qwen_like_type)


@pytest.mark.parametrize("qtype, reader", [(Q.Q8_0, q8_0_as_blockwise), (Q.Q5_0, q5_0_as_blockwise)])
def test_q8_0_and_q5_0_blocks_convert_exactly(qtype, reader):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 96)).astype(np.float32) * rng.uniform(0.01, 3, (7, 1)).astype(np.float32)
    w[2, :32] = 0  # an all-zero block
    raw = gguf_quantize(w, qtype)
    codes, scales = reader(raw)
    assert codes.dtype == np.int8 and codes.shape == (7, 96) and scales.shape == (7, 3)
    if qtype == Q.Q5_0:
        assert codes.min() >= -16 and codes.max() <= 15
    np.testing.assert_array_equal(int8_dequantized(codes, scales), gguf_dequantize(raw, qtype))


def blockwise_weight(rows: int, cols: int, seed: int = 1) -> LinearWeight:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-128, 128, (rows, cols), dtype=np.int16).astype(np.int8)
    scales = rng.uniform(1e-4, 1e-2, (rows, cols // 32)).astype(np.float32)  # scales that differ block to block
    return LinearWeight(codes, scales)


def linear_session(weight: LinearWeight, kind: str):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    b = GraphBuilder(kind)
    y = b.linear("x", weight, None, "lin")
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", weight.in_features])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", weight.out_features])], "t")
    ops = [n.op_type for n in model.graph.node]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), ops


def test_a_blockwise_weight_runs_as_matmulnbits_with_its_block_scales():
    weight = blockwise_weight(40, 96)
    assert weight.blockwise and weight.storage == "int8-blockwise"
    sess, ops = linear_session(weight, "int8-nbits")
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    want = x @ weight.dequantized().T
    # int8 activations per block of 32 (accuracy_level 4); the weights are exact
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() < 0.02 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["int8", "int8-w7"])  # int8-s8 saturates without VNNI
def test_the_other_int8_kinds_rerun_a_blockwise_weight_per_channel(kind):
    weight = blockwise_weight(40, 96)
    sess, ops = linear_session(weight, kind)
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    want = x @ weight.dequantized().T
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() < 0.1 * np.abs(want).max()  # re-rounded, not exact


def test_blockwise_weights_split_into_pieces_and_stack_as_they_are(monkeypatch):
    a, b = blockwise_weight(24, 64, seed=3), blockwise_weight(8, 64, seed=4)
    stacked = stack_rows([a, b])
    assert stacked.blockwise and stacked.scale.shape == (32, 2)
    np.testing.assert_array_equal(stacked.dequantized(), np.concatenate([a.dequantized(), b.dequantized()]))
    per_channel = LinearWeight(*onnx_graph.quantize_rows_int8(a.dequantized()))
    assert not stack_rows([per_channel, b]).storage.startswith("int8")  # mixed storages: float, never mixed scales
    monkeypatch.setattr(onnx_graph, "LINEAR_PIECE_MAX_WEIGHTS", 10 * 64)  # pieces of 10 rows
    sess, ops = linear_session(stacked, "int8-nbits")
    assert ops.count("MatMulNBits") == 4
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    want = x @ stacked.dequantized().T
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() < 0.02 * np.abs(want).max()


def test_a_blockwise_embedding_table_looks_up_the_exact_rows():
    w = blockwise_weight(50, 64, seed=6)
    weights = {"tok_embeddings.weight": w.w, "tok_embeddings.weight_scale": w.scale, "x_scale": np.ones(2, np.float32)}
    ids = np.array([[3, 49], [0, 3]])
    for kind in ("int8-w7", "fp32"):
        table = EmbeddingTable(weights, kind)
        np.testing.assert_array_equal(table(ids), w.dequantized()[ids])


def test_default_load_keeps_q8_0_and_q5_0_as_the_files_values(qwen_like_gguf):
    source = load_gguf(qwen_like_gguf)
    assert source.quantization == "int8-blockwise"
    _, scales = split_int8(source.weights)
    assert scales["layers.0.feed_forward.w2.weight"].ndim == 1  # Q6_K: int8 per channel
    blockwise = [n for n, s in scales.items() if s.ndim == 2]
    assert "output.weight" in blockwise and "tok_embeddings.weight" in blockwise and "layers.1.attention.wq.weight" in blockwise
    exact = load_gguf(qwen_like_gguf, precision="fp32").weights
    widened = dequantize(source.weights)  # what the torch runtime loads
    for name in blockwise:
        np.testing.assert_array_equal(widened[name], exact[name])


def test_blockwise_int8_is_closer_to_the_file_than_int8_per_channel(qwen_like_gguf):
    reference = OnnxRuntime(load_gguf(qwen_like_gguf, precision="fp32"), precision="fp32")
    blockwise = OnnxRuntime(load_gguf(qwen_like_gguf, precision="int8-nbits"), precision="int8-nbits")
    assert blockwise.linear_kind == "int8-nbits"
    per_channel = OnnxRuntime(load_gguf(qwen_like_gguf, precision="int8"), linear_kind="int8-w7")
    rel_blockwise, agree_blockwise = logit_errors(blockwise, reference)
    rel_channel, agree_channel = logit_errors(per_channel, reference)
    assert np.median(rel_blockwise) < 0.8 * np.median(rel_channel)  # measured 0.051 against 0.077 (AVX2, no VNNI)
    assert agree_blockwise >= agree_channel


def test_auto_keeps_a_ggufs_8_bits_on_a_cpu_without_vnni(qwen_like_gguf, monkeypatch):
    from codecomplete.runtime import onnx as onnx_runtime
    from codecomplete.runtime.cpu import CpuInfo

    avx2 = CpuInfo("test AVX2", 2, 2, frozenset({"avx2", "fma"}), "x86_64")
    monkeypatch.setattr(onnx_runtime, "this_cpu", lambda: avx2)
    auto = OnnxRuntime(load_gguf(qwen_like_gguf))
    assert (auto.precision, auto.linear_kind) == ("int8", "int8") and "8-bit" in auto.precision_reason
    assert avx2.int8_linear_kind()[0] == "int8-w7"  # a folder's int8 weights: 7 bits there
    vnni = CpuInfo("test VNNI", 2, 2, frozenset({"avx2", "avx512_vnni"}), "x86_64")
    assert vnni.int8_linear_kind(keep_8_bits=True)[0] == "int8-s8"


def test_blockwise_to_per_channel_in_chunks_is_quantize_rows_int8_of_the_values():
    from codecomplete.models.format.folder import blockwise_to_per_channel, quantize_rows_int8

    w = blockwise_weight(37, 64, seed=8)
    codes, scales = blockwise_to_per_channel(w.w, w.scale, chunk_rows=5)
    want_codes, want_scales = quantize_rows_int8(w.dequantized())
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scales, want_scales)
