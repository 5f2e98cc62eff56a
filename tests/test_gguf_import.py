"""GGUF import: files the tests write with gguf.GGUFWriter (tiny dims, several quant types)
must load with the same weights, tokens and logits as transformers' own GGUF loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from codecomplete.models.format.folder import ModelLoadError, dequantize  # noqa: E402
from codecomplete.models.format.gguf_import import (  # noqa: E402
    GGUFFile,
    load_gguf,
    unpermute_rope_rows,
)
from codecomplete.models.testing import SAMPLE_CODE, train_test_tokenizer  # noqa: E402
from codecomplete.runtime import load_runtime  # noqa: E402
from codecomplete.runtime.torch import build_torch_model  # noqa: E402

TEXTS = [
    SAMPLE_CODE,
    "def print_values(values):\n    for value in values:\n        print(value)\n",
    "x = 12345 + 67\n\n\n\tif x:\r\n        return 'it''s'\n",
    "naïve café — 你好 <|fim_prefix|> a<|endoftext|>b",
    "   \n  leading and trailing   ",
]
K_QUANT_BLOCK = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}  # bytes per 256 weights


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows (pairs dims i and i + D/2)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(rows: int, cols: int, qtype: Q, rng) -> np.ndarray:
    """Random but sane K-quant blocks (gguf can dequantize K types, not write them)."""
    n_blocks = rows * cols // 256
    raw = rng.integers(0, 256, size=(n_blocks, K_QUANT_BLOCK[qtype]), dtype=np.uint8)
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        raw[:, -2:] = np.full(n_blocks, 2e-4, np.float16).view(np.uint8).reshape(-1, 2)
    else:  # d, dmin, 6-bit scales and mins, ...
        raw[:, 0:2] = np.full(n_blocks, 1e-3, np.float16).view(np.uint8).reshape(-1, 2)
        raw[:, 2:4] = np.full(n_blocks, 5e-4, np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def encode_tensor(arr: np.ndarray, qtype: Q, rng) -> np.ndarray:
    if qtype == Q.F32:
        return arr.astype(np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    if qtype in K_QUANT_BLOCK:
        return random_k_quant(arr.shape[0], arr.shape[1], qtype, rng)
    return gguf.quants.quantize(arr.astype(np.float32), qtype)


def gguf_name(hf_name: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in table:
        return table[hf_name]
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    _, _, layer, *rest = hf_name.split(".")
    kind = rest.pop()
    return f"blk.{layer}.{parts['.'.join(rest)]}.{kind}"


def pick_type(name: str) -> Q:
    """A mix of every supported storage type over the tiny model."""
    if name.endswith(".bias") or "norm" in name:
        return Q.F32
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name.endswith("ffn_down.weight"):
        return (Q.Q4_K, Q.Q5_K, Q.Q6_K)[layer % 3]
    if name.endswith("ffn_gate.weight"):
        return Q.F16
    if name.endswith("ffn_up.weight"):
        return Q.BF16
    if name.endswith(("attn_q.weight", "attn_output.weight")):
        return Q.Q5_0
    return Q.Q8_0


def tiny_hf_model(arch: str, vocab_size: int, tie: bool, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=256, vocab_size=vocab_size,
                               max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                               tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.08 * torch.randn(p.shape, generator=g))
    return model


def gguf_writer(path, arch: str, hf_cfg):
    """A GGUF writer holding the architecture keys of a transformers config (context 512)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(hf_cfg.num_attention_heads)
    w.add_head_count_kv(hf_cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    return w


def write_gguf(path, arch: str, tie: bool, pre: str, seed: int = 0, extra=None, all_f32: bool = False,
               pick=None):
    """A tiny GGUF written the way llama.cpp's converter would (q/k permuted for llama)."""
    tok_file = train_test_tokenizer(path.with_suffix(".tokenizer.json"), vocab_size=300)
    tok = json.loads(tok_file.read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    model = tiny_hf_model(arch, len(tokens), tie, seed)
    hf_cfg = model.config
    w = gguf_writer(path, arch, hf_cfg)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(arch == "llama")
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    rng = np.random.default_rng(seed)
    for hf_name, t in model.state_dict().items():
        if tie and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output tensor for tied embeddings
        name = gguf_name(hf_name)
        arr = t.numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = hf_cfg.num_attention_heads if "attn_q" in name else hf_cfg.num_key_value_heads
            arr = llama_cpp_permute(arr, heads)
        qtype = Q.F32 if all_f32 else (pick or pick_type)(name)
        data = encode_tensor(arr, qtype, rng)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODECOMPLETE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=[("qwen2", False, "qwen2"), ("llama", True, "llama-bpe")],
                ids=["qwen2-untied", "llama-tied"])
def gguf_case(request, tmp_path_factory):
    arch, tie, pre = request.param
    folder = tmp_path_factory.mktemp(f"gguf-{arch}")
    path = write_gguf(folder / f"tiny-{arch}.gguf", arch, tie, pre, seed=3)
    return path, arch, tie


@pytest.fixture(scope="module")
def reference(gguf_case):
    """transformers' own GGUF loading of the same file: (tokenizer, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_case[0]
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def test_header_matches_gguf_reader(gguf_case):
    path = gguf_case[0]
    reader = gguf.GGUFReader(str(path))
    with GGUFFile(path) as gf:
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = gf.metadata[key]
            ours = ours.tolist() if isinstance(ours, np.ndarray) else ours
            assert ours == pytest.approx(field.contents()), key
        for t in reader.tensors:
            info = gf.tensors[t.name]
            assert info.offset == t.data_offset and info.shape == tuple(reversed(t.shape.tolist()))


def test_every_tensor_dequantizes_as_gguf_does(gguf_case):
    path = gguf_case[0]
    reader = gguf.GGUFReader(str(path))
    seen = set()
    with GGUFFile(path) as gf:
        for t in reader.tensors:
            want = gguf.quants.dequantize(t.data, t.tensor_type)
            np.testing.assert_array_equal(gf.tensor(t.name), want.reshape(gf.tensors[t.name].shape))
            seen.add(t.tensor_type)
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K} <= seen


def test_tokens_match_transformers(gguf_case, reference):
    source = load_gguf(gguf_case[0], cache=False)
    ref_tok = reference[0]
    for text in TEXTS:
        assert source.tokenizer.encode(text) == ref_tok.encode(text, add_special_tokens=False)
        if "<|" not in text:  # special tokens decode to nothing
            assert source.tokenizer.decode(source.tokenizer.encode(text)) == text


def test_logits_match_transformers(gguf_case, reference):
    path, arch, tie = gguf_case
    source = load_gguf(path, cache=False, precision="fp32")
    assert source.config.tie_embeddings == tie and source.config.qkv_bias == (arch == "qwen2")
    assert source.config.align_back_off == "fixed"
    ids = source.tokenizer.encode(TEXTS[1])
    with torch.no_grad():
        want = reference[1](torch.tensor([ids])).logits[0].numpy()
        got = build_torch_model(source)(torch.tensor([ids]))[0].numpy()
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_cached_load_runs_prefill_and_decode_like_the_full_forward(gguf_case, reference):
    path = gguf_case[0]
    first = load_gguf(path, precision="fp32")
    rt = load_runtime(str(path), runtime="torch", precision="fp32")  # the second load comes from the cache
    ids = rt.tokenizer.encode(TEXTS[1])
    with torch.no_grad():
        want = reference[1](torch.tensor([ids])).logits[0].numpy()
    state, last = rt.prefill(ids[:-4])
    assert np.abs(last - want[-5]).max() < 1e-4  # the fp32 cache keeps the file's values exactly
    branches = rt.start_branches(state, 1, 4)
    for step, tok in enumerate(ids[-4:-1]):
        logits = rt.decode(state, branches, [tok])[0]
        assert logits.argmax() == want[len(ids) - 4 + step].argmax()
    assert first.config == rt.config


def test_precisions_keep_the_weights(gguf_case):
    path = gguf_case[0]
    exact = load_gguf(path, cache=False, precision="fp32").weights
    f32 = load_gguf(path, precision="fp32")
    again = load_gguf(path, precision="fp32")
    i8 = load_gguf(path, precision="int8")
    native = load_gguf(path)
    for name, w in exact.items():
        np.testing.assert_array_equal(f32.weights[name], w)
        np.testing.assert_array_equal(again.weights[name], w)
    assert f32.quantization == "none" and i8.quantization == "int8-per-channel"
    assert i8.weights["layers.0.attention.wq.weight"].dtype == np.int8
    # the tiny file has one Q4_K ffn_down (layer 0): 4-bit there, int8 for the 5/6/8-bit ones, float16 stays float16
    assert native.quantization == "int4-blockwise"
    assert native.weights["layers.0.feed_forward.w2.weight.q4"].dtype == np.uint8
    assert native.weights["layers.1.feed_forward.w2.weight"].dtype == np.int8  # Q5_K
    assert native.weights["layers.0.attention.wq.weight"].dtype == np.int8  # Q5_0
    assert native.weights["layers.0.feed_forward.w1.weight"].dtype == np.float32  # F16, widened at load only
    widened = dequantize(native.weights)
    for name, w in exact.items():
        assert np.sqrt(((widened[name] - w) ** 2).mean()) <= 0.05 * np.sqrt((w ** 2).mean()) + 1e-7, name


def test_cache_lives_under_codecomplete_cache(tmp_path, gguf_case):
    load_gguf(gguf_case[0])
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    assert folders[0].name.endswith("-native")


def test_the_removed_environment_variable_is_refused(gguf_case, monkeypatch):
    monkeypatch.setenv("CODECOMPLETE_GGUF_CACHE_DTYPE", "int8")
    with pytest.raises(ModelLoadError, match="use --precision"):
        load_gguf(gguf_case[0])


def test_qwen_token_facts_from_text(gguf_case):
    path, arch, _ = gguf_case
    source = load_gguf(path, cache=False)
    cfg, tok = source.config, source.tokenizer
    assert cfg.fim_order == "psm"
    assert cfg.fim_prefix_id == tok.token_id("<|fim_prefix|>")
    assert cfg.fim_middle_id == tok.token_id("<|fim_middle|>")
    assert {tok.token_id("<|endoftext|>"), tok.token_id("<|file_sep|>"), tok.token_id("<|fim_pad|>")} <= set(cfg.eos_ids)
    assert cfg.bos_id == (tok.token_id("<|endoftext|>") if arch == "llama" else -1)
    assert cfg.max_seq_len == 512


def test_fim_ids_from_metadata_win(tmp_path):
    extra = {"tokenizer.ggml.fim_pre_token_id": 40, "tokenizer.ggml.fim_suf_token_id": 41,
             "tokenizer.ggml.fim_mid_token_id": 42, "tokenizer.ggml.eot_token_id": 43}
    path = write_gguf(tmp_path / "meta.gguf", "qwen2", True, "qwen2", extra=extra, all_f32=True)
    cfg = load_gguf(path, cache=False).config
    assert (cfg.fim_prefix_id, cfg.fim_suffix_id, cfg.fim_middle_id) == (40, 41, 42)
    assert 43 in cfg.eos_ids


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)


def test_unknown_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "g.gguf", cache=False)


def test_truncated_or_foreign_files_are_clear_errors(tmp_path, gguf_case):
    data = gguf_case[0].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated|readable"):
        load_gguf(tmp_path / "cut.gguf", cache=False)
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_gguf(tmp_path / "junk.gguf", cache=False)


def write_sentencepiece_gguf(path):
    """A llama-architecture GGUF with a SentencePiece vocabulary (byte fallback, scores,
    no merges) and CodeLlama's FIM tokens, as llama.cpp stores Llama 2 / CodeLlama."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator([SAMPLE_CODE] * 4, vocab_size=240, show_progress=False)
    pieces = [p for p, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(p for p in pieces if p not in tokens):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    for fim in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"):
        tokens.append(fim)
        types.append(4)
        scores.append(0.0)
    model = tiny_hf_model("llama", len(tokens), tie=False, seed=5)
    hf_cfg = model.config
    w = gguf_writer(path, "llama", hf_cfg)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf_name, t in model.state_dict().items():
        name = gguf_name(hf_name)
        arr = t.numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = hf_cfg.num_attention_heads if "attn_q" in name else hf_cfg.num_key_value_heads
            arr = llama_cpp_permute(arr, heads)
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocabulary_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    source = load_gguf(path, cache=False)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS[:3] + ["naïve café — 你好", "indented\n\tx = 1\n    y  =  2 \n"]:
        assert source.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
    # Text that starts with spaces: SentencePiece (and llama.cpp) always add the dummy "▁";
    # transformers' Metaspace conversion skips it when the text already starts with one.
    cfg, tok = source.config, source.tokenizer
    assert tok.encode("  a") == [tok.token_id("▁"), tok.token_id("▁"), tok.token_id("▁a")]
    assert cfg.bos_id == 1 and 2 in cfg.eos_ids and tok.token_id("▁<EOT>") in cfg.eos_ids
    assert (cfg.fim_prefix_id, cfg.fim_suffix_id, cfg.fim_middle_id) == tuple(
        tok.token_id(t) for t in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    assert tok.token_bytes[cfg.fim_prefix_id] == b""


def test_linear_rope_scaling_and_the_deepseek_coder_split(tmp_path, monkeypatch):
    """DeepSeek-Coder's GGUF: llama with rope.scaling linear x4 and pre-tokenizer deepseek-coder."""
    from transformers import AutoModelForCausalLM

    plain_writer = gguf_writer

    def scaled_writer(path, arch, hf_cfg):
        w = plain_writer(path, arch, hf_cfg)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        return w

    monkeypatch.setitem(globals(), "gguf_writer", scaled_writer)
    path = write_gguf(tmp_path / "ds.gguf", "llama", False, "deepseek-coder", seed=2, all_f32=True)
    source = load_gguf(path, cache=False, precision="fp32")
    assert source.config.rope_linear_factor == 4.0
    text = "x=1234567\r\nfoo.bar(baz)  # 中文한국어!!?\n\n\tend"
    ids = source.tokenizer.encode(text)
    assert source.tokenizer.decode(ids) == text
    assert [source.tokenizer.decode([i]) for i in ids[2:9]] == list("1234567")  # single digits
    plain = tiny_hf_model("llama", source.config.vocab_size, tie=False, seed=2)
    cfg = plain.config
    cfg.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    scaled = AutoModelForCausalLM.from_config(cfg).float().eval()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        want = scaled(torch.tensor([ids])).logits[0].numpy()
        got = build_torch_model(source)(torch.tensor([ids]))[0].numpy()
        unscaled = plain(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-4 < np.abs(got - unscaled).max()
