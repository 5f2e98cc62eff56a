"""The memory-traffic floor, the 7B-shaped random model's config and stand-in tokenizer,
and `codecomplete bench decode` on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from codecomplete.models.format.config import ModelConfig
from codecomplete.models.testing import QWEN_SPECIAL_IDS, qwen7b_shape_config, standin_tokenizer
from codecomplete.runtime.traffic import dtype_bytes, floor_ms, step_traffic_bytes


def test_traffic_reads_weights_once_and_the_context_once_or_per_row():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, tie_embeddings=True)
    kv_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 kv heads, head 16, bf16
    weights = cfg.n_params() * 2
    one = step_traffic_bytes(cfg, "bf16", [100], 1)
    assert one == weights + (100 + 1) * kv_token + 1000 * 4
    bif = step_traffic_bytes(cfg, "bf16", [100, 50], [4, 2], bifurcated=True, decoded=3)
    plain = step_traffic_bytes(cfg, "bf16", [100, 50], [4, 2], bifurcated=False, decoded=3)
    assert bif == weights + (150 + 6 * 3 + 6) * kv_token + 6 * 1000 * 4
    assert plain - bif == (3 * 100 + 1 * 50) * kv_token
    untied = ModelConfig(**{**cfg.to_dict(), "tie_embeddings": False})
    assert step_traffic_bytes(untied, "bf16", [100], 1) == one  # the input table is not read whole
    assert dtype_bytes("torch.float32") == 4 and floor_ms(4_300_000_000, 4300.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        step_traffic_bytes(cfg, "bf16", [100, 5], [1])
    with pytest.raises(ValueError):
        dtype_bytes("int3")


def test_qwen7b_shape_and_a_stand_in_tokenizer_that_fits_its_vocab():
    cfg = qwen7b_shape_config()
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size) == (
        28, 3584, 28, 4, 128, 18944, 152064)
    assert cfg.qkv_bias and cfg.rope_theta == 1e6 and cfg.fim_middle_id == QWEN_SPECIAL_IDS["<|fim_middle|>"]
    assert 7.5e9 < cfg.n_params() < 7.7e9
    tok = standin_tokenizer(qwen7b_shape_config(vocab_size=151700))
    assert tok.vocab_size == 151700
    ids = tok.encode("x = 1<|fim_suffix|>é")
    assert ids[-3] == QWEN_SPECIAL_IDS["<|fim_suffix|>"] and all(i < 256 for i in ids if i != ids[-3])
    assert tok.decode(ids) == "x = 1é" and tok.token_bytes[ord("x")] == b"x"


def test_random_model_is_built_where_it_runs_with_unit_norms():
    torch = pytest.importorskip("torch")
    from codecomplete.models.testing import random_torch_model

    cfg = qwen7b_shape_config(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, n_layers=2, vocab_size=300)
    model = random_torch_model(cfg, "cpu", "bf16", seed=3)
    assert model.layers[1].attention.wqkv.weight.dtype == torch.bfloat16
    assert torch.all(model.norm.weight == 1) and 0.015 < float(model.output.weight.float().std()) < 0.025
    again = random_torch_model(cfg, "cpu", "bf16", seed=3)
    assert torch.equal(model.layers[0].feed_forward.w2.weight, again.layers[0].feed_forward.w2.weight)


def test_bench_decode_runs_on_cpu_and_writes_its_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, "-m", "codecomplete", "bench", "decode", "--device", "cpu", "--model", "tiny",
                           "--rows", "1,4", "--contexts", "40", "--decoded", "1", "--steps", "2", "--repeat", "1",
                           "--variants", "loop,plain", "--checks", "off", "--latency", "off", "--copy-gbps", "10",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"loop", "plain"} and {r["rows"] for r in rows} == {1, 4}
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert "== bench decode" in proc.stdout and "keystroke_ms" in proc.stdout
