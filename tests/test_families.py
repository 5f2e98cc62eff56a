"""StarCoder2, Gemma (CodeGemma) and Granite from Hugging Face folders and GGUF files, on both
runtimes: random-weight checkpoints that transformers itself writes must give transformers'
logits in our torch model and in the onnx graph (fp32), agree on top-1 in int8, give the
same logits once written to GGUF as llama.cpp's converter names tensors and metadata
(gguf's own tensor-name tables), honour a sliding window, and complete in the engine with
the FIM tokens found by their text."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from codecomplete.engine import Engine  # noqa: E402
from codecomplete.models.format.gguf_import import load_gguf  # noqa: E402
from codecomplete.models.format.hf_import import load_hf_folder  # noqa: E402
from codecomplete.models.testing import SAMPLE_CODE  # noqa: E402
from codecomplete.request import CompletionOptions, CompletionRequest  # noqa: E402
from codecomplete.runtime import load_runtime  # noqa: E402
from codecomplete.runtime.onnx import OnnxRuntime  # noqa: E402
from codecomplete.runtime.torch import TorchRuntime, build_torch_model  # noqa: E402

PROMPT = "def print_values(values):\n    for value in values:\n        print(value)\n    return len(values)\n"
STARCODER2_SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                       "<repo_name>", "<file_sep>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CODEGEMMA_FIM = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
WINDOW = 8  # a sliding window shorter than the test prompts


def starcoder2_tokenizer():
    """Byte-level BPE with single digits, StarCoder2's pre-tokenizer (GGUF pre `starcoder`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=STARCODER2_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_CODE] * 4, trainer=trainer)
    return tok


def gemma_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """SentencePiece-style pieces (▁ for a space, no dummy prefix) and their merges."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, max_token_length=8)
    tok.train_from_iterator([SAMPLE_CODE] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return pieces, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def gemma_tokenizer():
    """CodeGemma's layout: <pad> <eos> <bos> <unk>, the FIM tokens, byte fallback, pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces, merges = gemma_pieces()
    tokens = GEMMA_SPECIALS + CODEGEMMA_FIM + BYTE_TOKENS + [p for p in pieces if p not in BYTE_TOKENS]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_SPECIALS + CODEGEMMA_FIM])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def _randomize(model, seed: int, gemma: bool) -> None:
    """Weights big enough that logits are far from flat (so argmaxes mean something).
    Gemma's RMSNorm scales by 1 + weight: its norm weights are drawn around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def write_hf_folder(path, family: str, tie: bool = True, seed: int = 0, **overrides):
    """save_pretrained a random-weight StarCoder2, Gemma or Granite model and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if family in ("starcoder2", "granite"):  # Granite's vocabulary is StarCoder's
        tok = starcoder2_tokenizer()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        kwargs = dict(num_key_value_heads=2, rope_theta=100000.0, bos_token_id=0, eos_token_id=0)
        if family == "starcoder2":
            kwargs.update(norm_epsilon=1e-5, use_bias=True, hidden_act="gelu_pytorch_tanh", sliding_window=None)
        else:  # multipliers as far from 1 as Granite 3's (12, 0.0078125, 0.22, 8)
            kwargs.update(rms_norm_eps=1e-6, embedding_multiplier=6.0, attention_multiplier=0.05,
                          residual_multiplier=0.3, logits_scaling=4.0, attention_bias=True)
    else:
        tok = gemma_tokenizer()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                       unk_token="<unk>", pad_token="<pad>")
        kwargs = dict(num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)  # MQA; head_dim not dim / heads
    kwargs.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=tok.get_vocab_size(), max_position_embeddings=512, tie_word_embeddings=tie)
    kwargs.update(overrides)
    cfg = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    _randomize(model, seed, gemma=family == "gemma")
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# ---------------------------------------------------------------- GGUF, as llama.cpp writes it


def gguf_type(name: str, quantized: bool) -> Q:
    if not quantized or name.endswith(".bias") or "norm" in name or name == "token_embd.weight":
        return Q.F32
    return Q.Q4_0 if "ffn" in name else Q.Q8_0


def write_gguf(path, family: str, model, hf_tok, quantized: bool = False, window: int = 0):
    """The model as llama.cpp's convert_hf_to_gguf.py writes it: tensor names from gguf's
    TensorNameMap for the architecture, its metadata keys, Gemma's norm weights stored as
    1 + weight, no output tensor for tied embeddings, the tokenizer as gpt2 (StarCoder2)
    or SentencePiece (Gemma) vocabulary."""
    arch = {"starcoder2": gguf.MODEL_ARCH.STARCODER2, "gemma": gguf.MODEL_ARCH.GEMMA,
            "granite": gguf.MODEL_ARCH.GRANITE}[family]
    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if family == "starcoder2":
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_eps(cfg.norm_epsilon)
    elif family == "granite":  # llama's keys and the multipliers under llama.cpp's names
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    else:  # llama.cpp's Gemma converter writes no rope base (10000 is its default)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if window:
        w.add_sliding_window(window)
    tok = json.loads(hf_tok.to_str())
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    added = {t["content"] for t in tok["added_tokens"]}
    if family in ("starcoder2", "granite"):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("starcoder" if family == "starcoder2" else "refact")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in added else 1 for t in tokens])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
        w.add_bos_token_id(vocab["<|endoftext|>"])
        w.add_eos_token_id(vocab["<|endoftext|>"])
    else:  # SentencePiece: scores rank the merges, as in a tokenizer.model
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        types = [3 if t in GEMMA_SPECIALS else 4 if t in CODEGEMMA_FIM else 6 if t in BYTE_TOKENS else 1
                 for t in tokens]
        types[vocab["<unk>"]] = 2
        w.add_token_types(types)
        w.add_token_scores([0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)])
        w.add_add_space_prefix(False)
        w.add_bos_token_id(vocab["<bos>"])
        w.add_eos_token_id(vocab["<eos>"])
        w.add_unk_token_id(vocab["<unk>"])
        w.add_pad_token_id(vocab["<pad>"])
        w.add_add_bos_token(True)
    for hf_name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        arr = t.numpy().astype(np.float32)
        if family == "gemma" and hf_name.endswith("norm.weight"):
            arr = arr + 1  # what llama.cpp's GemmaModel.modify_tensors does
        if family == "granite" and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads)
        qtype = gguf_type(name, quantized)
        data = arr if qtype == Q.F32 else gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (Granite's converter inherits it): q/k rows of each
    head reordered so that dims i and i + D/2 sit side by side (also for a bias)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- fixtures

CASES = {
    "starcoder2-tied": ("starcoder2", True),
    "starcoder2-untied": ("starcoder2", False),
    "gemma-mqa": ("gemma", True),
    "granite-tied": ("granite", True),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODECOMPLETE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(HF folder, GGUF file, transformers model, family) of one random checkpoint."""
    family, tie = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = write_hf_folder(folder, family, tie=tie, seed=len(request.param))
    from tokenizers import Tokenizer

    gguf_path = write_gguf(folder.parent / f"{request.param}.gguf", family, model,
                           Tokenizer.from_file(str(folder / "tokenizer.json")))
    return folder, gguf_path, model, family


def _ids(source) -> list[int]:
    bos = [source.config.bos_id] if source.config.bos_id >= 0 else []
    return bos + source.tokenizer.encode(PROMPT)


def _prefill_and_decode(rt, ids: list[int], n_decode: int) -> list[np.ndarray]:
    """Logits after each position from ids[-n_decode - 1] on: a prefill, then decode steps."""
    n_prompt = len(ids) - n_decode
    state, last = rt.prefill(ids[:n_prompt])
    out = [last]
    branches = rt.start_branches(state, 2, n_decode)
    for tok in ids[n_prompt:]:
        out.append(rt.decode(state, branches, [tok, tok])[0])
    return out


# ---------------------------------------------------------------- Hugging Face folders


def test_config_follows_the_family(case):
    folder, _, model, family = case
    cfg = load_hf_folder(folder).config
    hf = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    if family == "granite":
        assert (cfg.embedding_scale, cfg.attention_scale, cfg.residual_scale, cfg.logits_divisor) == (6.0, 0.05, 0.3, 4.0)
        assert cfg.qkv_bias and cfg.wo_bias and not cfg.mlp_bias and cfg.activation == "silu"
    elif family == "starcoder2":
        assert (cfg.norm_kind, cfg.mlp_gated, cfg.activation) == ("layer", False, "gelu_tanh")
        assert cfg.qkv_bias and cfg.wo_bias and cfg.mlp_bias and cfg.rope_theta == 100000.0
        assert cfg.norm_eps == 1e-5 and cfg.embedding_scale == 1.0
    else:
        assert (cfg.norm_kind, cfg.mlp_gated, cfg.activation) == ("rms", True, "gelu_tanh")
        assert cfg.head_dim == 32 != cfg.dim // cfg.n_heads and cfg.n_kv_heads == 1
        assert cfg.embedding_scale == pytest.approx(8.0) and not (cfg.qkv_bias or cfg.wo_bias or cfg.mlp_bias)


def test_gemma_norm_weights_are_stored_as_one_plus_weight(tmp_path):
    model = write_hf_folder(tmp_path, "gemma")
    weights = load_hf_folder(tmp_path).weights
    want = model.state_dict()["model.layers.1.post_attention_layernorm.weight"].numpy()
    np.testing.assert_array_equal(weights["layers.1.ffn_norm.weight"], want + np.float32(1))


def test_torch_full_forward_matches_transformers(case):
    folder, _, model, _ = case
    source = load_hf_folder(folder)
    ids = _ids(source)
    with torch.no_grad():
        got = build_torch_model(source)(torch.tensor([ids]))[0].numpy()
    want = hf_logits(model, ids)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_runtime_prefill_and_decode_match_transformers(case, runtime):
    folder, _, model, _ = case
    rt = load_runtime(str(folder), runtime=runtime, precision="fp32")
    ids = _ids(load_hf_folder(folder))
    want = hf_logits(model, ids)
    got = _prefill_and_decode(rt, ids, 5)
    for k, logits in enumerate(got):
        assert np.abs(logits - want[len(ids) - 6 + k]).max() < 1e-4, k


def test_onnx_int8_agrees_with_transformers_on_top1(case):
    folder, _, model, _ = case
    source = load_hf_folder(folder)
    rt = OnnxRuntime(source, precision="int8")
    ids = _ids(source) + source.tokenizer.encode(SAMPLE_CODE[:200])
    want = hf_logits(model, ids)
    agree, state = [], None
    for k in range(len(ids) - 30, len(ids) + 1):
        state, logits = rt.prefill(ids[:k], state)
        agree.append(logits.argmax() == want[k - 1].argmax())
    assert np.mean(agree) >= 0.85


# ---------------------------------------------------------------- GGUF files


def test_gguf_config_and_tokens_match_the_folder(case):
    folder, gguf_path, _, family = case
    from_hf, from_gguf = load_hf_folder(folder), load_gguf(gguf_path, cache=False, precision="fp32")
    a, b = from_hf.config, from_gguf.config
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "rope_theta", "norm_eps",
                  "qkv_bias", "wo_bias", "mlp_bias", "norm_kind", "mlp_gated", "activation", "embedding_scale",
                  "attention_scale", "residual_scale", "logits_divisor",
                  "tie_embeddings", "vocab_size", "bos_id", "fim_prefix_id", "fim_suffix_id", "fim_middle_id",
                  "file_sep_id", "fim_order"):
        want = getattr(b, field)  # GGUF floats are float32
        assert getattr(a, field) == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), field
    assert set(a.eos_ids) <= set(b.eos_ids)
    if family != "gemma":  # the same byte-level BPE: the same ids
        assert from_gguf.tokenizer.encode(PROMPT) == from_hf.tokenizer.encode(PROMPT)
    else:  # merges rebuilt from SentencePiece scores: other ids maybe, the same text
        assert from_gguf.tokenizer.decode(from_gguf.tokenizer.encode(PROMPT)) == PROMPT


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_gguf_logits_match_transformers(case, runtime):
    _, gguf_path, model, _ = case
    source = load_gguf(gguf_path, precision="fp32")
    ids = _ids(source)
    want = hf_logits(model, ids)
    if runtime == "torch":
        with torch.no_grad():
            got = build_torch_model(source)(torch.tensor([ids]))[0].numpy()
        assert np.abs(got - want).max() < 1e-4
        return
    rt = OnnxRuntime(source, precision="fp32")
    for k, logits in enumerate(_prefill_and_decode(rt, ids, 4)):
        assert np.abs(logits - want[len(ids) - 5 + k]).max() < 1e-4, k


def test_quantized_gguf_runs_int8_and_4bit_and_agrees_on_top1(case, tmp_path):
    folder, _, model, family = case
    from tokenizers import Tokenizer

    path = write_gguf(tmp_path / "q.gguf", family, model, Tokenizer.from_file(str(folder / "tokenizer.json")),
                      quantized=True)
    source = load_gguf(path)  # the file's precision class: Q8_0 as int8, Q4_0 as 4-bit blocks
    assert source.quantization == "int4-blockwise"
    assert source.weights["layers.0.attention.wq.weight"].dtype == np.int8
    assert "layers.0.feed_forward.w3.weight.q4" in source.weights
    rt = OnnxRuntime(source)
    assert rt.precision == "int4"
    # against the file's own values widened (4-bit weights on flat random logits move the
    # top-1 away from transformers' float model itself: 0.68 measured, fp32 path alike)
    ids = _ids(source) + source.tokenizer.encode(SAMPLE_CODE[:120])
    with torch.no_grad():
        want = build_torch_model(load_gguf(path, precision="fp32"))(torch.tensor([ids]))[0].numpy()
    agree, state = [], None
    for k in range(len(ids) - 20, len(ids) + 1):
        state, logits = rt.prefill(ids[:k], state)
        agree.append(logits.argmax() == want[k - 1].argmax())
    assert np.mean(agree) >= 0.85  # 0.94 and 1.0 measured


def test_starcoder2_gguf_without_a_window_caps_its_context(tmp_path):
    from tokenizers import Tokenizer

    model = write_hf_folder(tmp_path / "hf", "starcoder2", max_position_embeddings=16384)
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    plain = load_gguf(write_gguf(tmp_path / "plain.gguf", "starcoder2", model, tok), cache=False).config
    assert (plain.max_seq_len, plain.sliding_window) == (4096, 0)  # where full and windowed attention agree
    named = load_gguf(write_gguf(tmp_path / "w.gguf", "starcoder2", model, tok, window=4096), cache=False).config
    assert (named.max_seq_len, named.sliding_window) == (16384, 4096)


# ---------------------------------------------------------------- the sliding window


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A StarCoder2 checkpoint with an 8-token window, and its GGUF naming the window."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("starcoder2-window")
    model = write_hf_folder(folder, "starcoder2", tie=False, seed=11, sliding_window=WINDOW)
    path = write_gguf(folder.parent / "starcoder2-window.gguf", "starcoder2", model,
                      Tokenizer.from_file(str(folder / "tokenizer.json")), window=WINDOW)
    return folder, path, model


def test_window_is_read_and_the_context_kept(windowed):
    folder, path, _ = windowed
    for source in (load_hf_folder(folder), load_gguf(path, cache=False)):
        assert (source.config.sliding_window, source.config.max_seq_len) == (WINDOW, 512)


def test_torch_honours_the_window_like_transformers(windowed):
    folder, _, model = windowed
    source = load_hf_folder(folder)
    ids = _ids(source)
    assert len(ids) > 3 * WINDOW
    want = hf_logits(model, ids)
    with torch.no_grad():
        got = build_torch_model(source)(torch.tensor([ids]))[0].numpy()
    assert np.abs(got - want).max() < 1e-4
    unwindowed = build_torch_model(replace(source, config=replace(source.config, sliding_window=0)))
    with torch.no_grad():
        assert np.abs(unwindowed(torch.tensor([ids]))[0].numpy() - want).max() > 1e-2  # the window matters here
    # decoding more tokens than the window: the window leaves the shared context behind
    rt = TorchRuntime(source, precision="fp32")
    for k, logits in enumerate(_prefill_and_decode(rt, ids, WINDOW + 4)):
        assert np.abs(logits - want[len(ids) - WINDOW - 5 + k]).max() < 1e-4, k


def test_onnx_honours_the_window_like_transformers(windowed):
    _, path, model = windowed
    source = load_gguf(path, precision="fp32")
    ids = _ids(source)
    want = hf_logits(model, ids)
    # prefill chunks shorter and longer than the window, then decode past it
    for chunk in (5, 64):
        rt = OnnxRuntime(source, precision="fp32", prefill_chunk_tokens=chunk)
        for k, logits in enumerate(_prefill_and_decode(rt, ids, WINDOW + 4)):
            assert np.abs(logits - want[len(ids) - WINDOW - 5 + k]).max() < 1e-4, (chunk, k)


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("source_kind", ["hf", "gguf"])
def test_engine_completes_with_the_family_fim_prompt(case, source_kind):
    folder, gguf_path, _, family = case
    engine = Engine.load(str(folder if source_kind == "hf" else gguf_path))
    cfg, tok = engine.runtime.config, engine.runtime.tokenizer
    fim = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>") if family == "gemma" else (
        "<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    assert (cfg.fim_prefix_id, cfg.fim_suffix_id, cfg.fim_middle_id) == tuple(tok.token_id(t) for t in fim)
    assert cfg.file_sep_id == tok.token_id("<|file_separator|>" if family == "gemma" else "<file_sep>")
    assert cfg.fim_order == "psm"
    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    \n"
    offset = text.index("    \n") + 4
    request = CompletionRequest(text=text, offset=offset, language="python", path="demo.py",
                                options=CompletionOptions(n=2, max_new_tokens=6, deadline_ms=60_000))
    tokens = engine.prompts.build(request, 8).tokens
    bos = [tok.token_id("<bos>")] if family == "gemma" else []
    header = [cfg.file_sep_id] + tok.encode("demo.py\n")  # the file's path, as in repository-level training
    assert tokens[:len(bos) + len(header) + 1] == bos + header + [cfg.fim_prefix_id]
    assert tokens.index(cfg.fim_suffix_id) > tokens.index(cfg.fim_prefix_id) and tokens[-1] == cfg.fim_middle_id
    completion = engine.complete(request)
    assert completion.tokens_generated > 0 and completion.prefill_new_tokens == len(tokens)
    assert all(isinstance(c.text, str) and c.stop_reason for c in completion.candidates)


# ---------------------------------------------------------------- llama.cpp itself, where it is built


@pytest.fixture(scope="module")
def llama_server():
    """A llama-server binary ($CODECOMPLETE_LLAMA_SERVER, the one `bench llamaserver` built, or
    on PATH); the test is skipped without one (CI)."""
    from codecomplete.bench.llamaserver import default_server_binary

    binary = os.environ.get("CODECOMPLETE_LLAMA_SERVER") or default_server_binary()
    if not binary or not os.access(binary, os.X_OK):
        pytest.skip("no llama-server binary (codecomplete/bench/build_llama_server.sh builds one)")
    return binary


def test_llama_cpp_reads_the_files_as_we_do(case, llama_server, tmp_path):
    """The GGUF files these tests write, run by llama.cpp: the same tokens and the same
    next-token log-probabilities (its top 5) as our model of the file, so the files are
    what llama.cpp's converter makes and we read them as llama.cpp does."""
    from codecomplete.bench.llamaserver import free_port, post_json, start_server

    _, gguf_path, _, family = case
    source = load_gguf(gguf_path, precision="fp32")
    ours = build_torch_model(source)
    port = free_port()
    server = start_server([llama_server, "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
                           "-c", "512", "-t", "1", "-np", "1"], port, tmp_path)
    try:
        tokens = post_json(f"{server.url}/tokenize", {"content": PROMPT, "add_special": True})["tokens"]
        assert tokens == _ids(source)
        compared = 0
        for end in range(len(tokens), len(tokens) - 8, -1):  # a prompt whose next token is whole UTF-8
            answer = post_json(f"{server.url}/completion", {"prompt": tokens[:end], "n_predict": 1, "n_probs": 5,
                                                            "temperature": 0, "cache_prompt": False})
            if "completion_probabilities" not in answer:
                continue
            with torch.no_grad():
                logprobs = torch.log_softmax(ours(torch.tensor([tokens[:end]]))[0, -1], -1).numpy()
            top = answer["completion_probabilities"][0]["top_logprobs"]
            assert top[0]["id"] == logprobs.argmax()
            for entry in top:
                assert abs(entry["logprob"] - logprobs[entry["id"]]) < 2e-3, (family, entry)  # its KV cache is float16
            compared += 1
        assert compared
    finally:
        server.stop()


# ---------------------------------------------------------------- CUDA (the GPU machine only)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_runtime_matches_transformers(case):
    """The torch runtime on CUDA (the Triton decode kernel where triton is there), fp32."""
    folder, _, model, _ = case
    rt = load_runtime(str(folder), runtime="torch", device="cuda", precision="fp32")
    ids = _ids(load_hf_folder(folder))
    want = hf_logits(model, ids)
    for k, logits in enumerate(_prefill_and_decode(rt, ids, 5)):
        assert np.abs(logits - want[len(ids) - 6 + k]).max() < 1e-3, k


@cuda
def test_cuda_runtime_honours_the_window(windowed):
    folder, _, model = windowed
    source = load_hf_folder(folder)
    ids = _ids(source)
    want = hf_logits(model, ids)
    rt = TorchRuntime(source, device="cuda", precision="fp32")
    for k, logits in enumerate(_prefill_and_decode(rt, ids, WINDOW + 4)):
        assert np.abs(logits - want[len(ids) - WINDOW - 5 + k]).max() < 1e-3, k
