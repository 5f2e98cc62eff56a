"""What keeps the onnx runtime's resident memory proportionate to its weights: one packed
copy of each weight, the embedding table left in the model folder's mapping, a context KV
whose pages become resident only where it is written."""

from __future__ import annotations

import numpy as np
import pytest

from codecomplete.models.format.folder import mapped_file
from codecomplete.models.format.source import load_model_source
from codecomplete.models.testing import make_test_model
from codecomplete.runtime import onnx as onnx_runtime
from codecomplete.runtime import onnx_graph
from codecomplete.runtime.onnx import OnnxRuntime, lazily_resident

TOKENS = [5, 9, 13, 17, 21, 25, 29]
HEAD_OPS = ("MatMul", "MatMulInteger", "MatMulNBits")


@pytest.fixture(scope="module")
def untied_int8_dir(tmp_path_factory):
    """A tiny int8 model with its own output layer (as Qwen2.5-Coder has)."""
    path = tmp_path_factory.mktemp("untied-int8")
    make_test_model(path, tie_embeddings=False)
    return path


def test_the_embedding_table_stays_in_the_folder_mapping_not_in_the_session(untied_int8_dir):
    rt = OnnxRuntime(load_model_source(untied_int8_dir))
    assert rt.embed.table.scale is not None and mapped_file(rt.embed.table.w) is not None  # int8 rows of the file
    assert not [n for n in rt._external_names if n.startswith("tok_embeddings")]
    ids = np.array([TOKENS])
    src = load_model_source(untied_int8_dir).weights
    expected = src["tok_embeddings.weight"][ids].astype(np.float32) * src["tok_embeddings.weight_scale"][ids][..., None]
    np.testing.assert_array_equal(rt.embed(ids), expected)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_a_big_linear_built_as_row_pieces_gives_the_same_logits(untied_int8_dir, monkeypatch, precision):
    whole = OnnxRuntime(load_model_source(untied_int8_dir), precision=precision, threads=1)
    _, expected = whole.prefill(TOKENS)
    monkeypatch.setattr(onnx_graph, "LINEAR_PIECE_MAX_WEIGHTS", 64 * 100)  # the head: pieces of 100 rows
    pieces = OnnxRuntime(load_model_source(untied_int8_dir), precision=precision, threads=1)
    src = load_model_source(untied_int8_dir)
    graph = onnx_graph.build_model(src.config, src.weights, pieces.linear_kind, pieces.kv_dtype).graph
    head_products = [n for n in graph.node if n.output[0].startswith("output.rows") and n.op_type in HEAD_OPS]
    assert len(head_products) == -(-src.config.vocab_size // 100)
    _, got = pieces.prefill(TOKENS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_weights_too_big_for_a_second_copy_get_no_one_thread_session(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(onnx_runtime, "SINGLE_THREAD_SESSION_MAX_WEIGHT_BYTES", 1024)
    rt = OnnxRuntime(load_model_source(tiny_model_dir), threads=None)
    assert rt.weight_bytes > 1024 and not rt.adaptive
    assert not rt.spin  # a busy CPU cannot move it to one thread: its workers sleep between ops
    rt.prefill(TOKENS)
    assert rt._single is None and rt._active is rt.session
    assert rt.describe()["threads_when_busy"] == rt.threads


def _rss_anon_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None


def test_context_kv_pages_become_resident_only_where_written():
    kv = lazily_resident((24, 32768, 2, 64), np.float16)  # Qwen2.5-Coder-0.5B's keys: 192 MB
    assert kv.flags.writeable and not kv[:, :8].any()
    before = _rss_anon_kb()
    if before is None:
        pytest.skip("no /proc/self/status here")
    kv[:, :100] = 1.0  # a 100-token prompt: 25 KB a layer
    grown_kb = _rss_anon_kb() - before
    assert grown_kb < 4096, f"writing 600 KB made {grown_kb} KB resident (huge pages?)"
    assert (kv[:, :100] == 1.0).all() and not kv[:, 100:108].any()
