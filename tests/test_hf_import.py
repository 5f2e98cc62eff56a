"""Hugging Face folder import: random-weight llama / qwen2 / mistral checkpoints written by
transformers itself must give transformers' logits in our model (full forward and the
runtime's prefill + decode path)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codecomplete.models.format.folder import ModelLoadError  # noqa: E402
from codecomplete.models.format.hf_import import load_hf_folder  # noqa: E402
from codecomplete.models.format.source import load_model_source  # noqa: E402
from codecomplete.models.testing import SAMPLE_CODE  # noqa: E402
from codecomplete.runtime import load_runtime  # noqa: E402
from codecomplete.runtime.torch import build_torch_model  # noqa: E402

QWEN_SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
STARCODER_SPECIALS = ["<s>", "</s>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
PROMPT = "def print_values(values):\n    for value in values:\n        print(value)\n    return len(values)\n"


def _tokenizer(specials: list[str], bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_CODE] * 4, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _randomize(model, seed: int) -> None:
    """Weights big enough that logits are far from flat (so argmaxes mean something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def write_hf_folder(path, model_type: str, tie: bool, seed: int = 0, vocab_pad: int = 0, sharded: bool = False,
                    **config_overrides):
    """save_pretrained a random-weight model and its tokenizer; returns the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if model_type == "qwen2":
        tok = _tokenizer(QWEN_SPECIALS)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        eos = tok.token_to_id("<|endoftext|>")
    else:
        tok = _tokenizer(STARCODER_SPECIALS, bos="<s>")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
        eos = tok.token_to_id("</s>")
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, vocab_size=tok.get_vocab_size() + vocab_pad,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  eos_token_id=eos)
    kwargs.update(config_overrides)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    _randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB" if sharded else "50GB")
    fast.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True), ("mistral", True), ("qwen2", False)],
                ids=["llama-untied", "qwen2-tied", "mistral-tied", "qwen2-untied"])
def hf_case(request, tmp_path_factory):
    model_type, tie = request.param
    path = tmp_path_factory.mktemp(f"hf-{model_type}")
    hf_model = write_hf_folder(path, model_type, tie, seed=len(model_type), vocab_pad=20 if tie else 0,
                               sharded=not tie)
    return path, hf_model, model_type, tie


def _hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def test_full_forward_matches_transformers(hf_case):
    path, hf_model, _, _ = hf_case
    source = load_hf_folder(path)
    ids = source.tokenizer.encode(PROMPT)
    ours = build_torch_model(source)
    with torch.no_grad():
        got = ours(torch.tensor([ids]))[0].numpy()
    want = _hf_logits(hf_model, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_prefill_and_decode_match_transformers(hf_case):
    path, hf_model, _, _ = hf_case
    rt = load_runtime(str(path), runtime="torch")
    ids = rt.tokenizer.encode(PROMPT)
    want = _hf_logits(hf_model, ids)
    n_prompt = len(ids) - 6
    state, last = rt.prefill(ids[:n_prompt])
    assert np.abs(last - want[n_prompt - 1]).max() < 1e-4
    branches = rt.start_branches(state, 2, 8)
    for step, tok in enumerate(ids[n_prompt:]):
        logits = rt.decode(state, branches, [tok, tok])
        assert np.abs(logits - want[n_prompt + step][None]).max() < 1e-4


def test_config_follows_the_checkpoint(hf_case):
    path, hf_model, model_type, tie = hf_case
    cfg = load_hf_folder(path).config
    hf = hf_model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, 16,
        hf.intermediate_size)
    assert cfg.qkv_bias == (model_type == "qwen2")
    assert cfg.tie_embeddings == tie
    assert cfg.vocab_size == hf.vocab_size
    assert cfg.align_back_off == "fixed"  # the minimal back-off was measured worse on an imported model


def test_tokenizer_covers_every_model_id(hf_case):
    path, _, _, _ = hf_case
    source = load_hf_folder(path)
    assert source.tokenizer.vocab_size == source.config.vocab_size
    assert source.tokenizer.decode(source.tokenizer.encode(PROMPT)) == PROMPT


def test_qwen_sentinels_and_stop_tokens_are_found(tmp_path):
    write_hf_folder(tmp_path, "qwen2", tie=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    source = load_hf_folder(tmp_path)
    cfg, tok = source.config, source.tokenizer
    assert cfg.fim_order == "psm" and cfg.bos_id == -1
    assert (cfg.fim_prefix_id, cfg.fim_suffix_id, cfg.fim_middle_id, cfg.fim_pad_id, cfg.file_sep_id) == tuple(
        tok.token_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>",
                                  "<|file_sep|>"))
    stops = {tok.token_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|file_sep|>")}
    assert stops <= set(cfg.eos_ids) and cfg.eos_ids[:2] == [1, 0]
    assert tok.token_bytes[cfg.fim_middle_id] == b""


def test_llama_bos_from_post_processor_and_starcoder_sentinels(tmp_path):
    write_hf_folder(tmp_path, "llama", tie=False)
    source = load_hf_folder(tmp_path)
    cfg, tok = source.config, source.tokenizer
    assert cfg.bos_id == tok.token_id("<s>")
    assert tok.token_id("</s>") in cfg.eos_ids
    assert cfg.fim_prefix_id == tok.token_id("<fim_prefix>") and cfg.fim_pad_id == tok.token_id("<fim_pad>")
    assert cfg.file_sep_id == -1


def test_bos_from_tokenizer_config_add_bos_token(tmp_path):
    write_hf_folder(tmp_path, "llama", tie=False)
    tok_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tok_json["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "add_bos_token": True}))
    assert load_hf_folder(tmp_path).config.bos_id == 0


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    hf_model = write_hf_folder(tmp_path, "qwen2", tie=True, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    weights = load_model_source(tmp_path).weights
    want = hf_model.state_dict()
    np.testing.assert_array_equal(weights["layers.1.feed_forward.w2.weight"],
                                  want["model.layers.1.mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(weights["layers.0.attention.wk.bias"],
                                  want["model.layers.0.self_attn.k_proj.bias"].numpy())


def test_a_window_on_every_layer_is_kept_with_the_whole_context(tmp_path):
    write_hf_folder(tmp_path, "mistral", tie=True, sliding_window=128)
    cfg = load_hf_folder(tmp_path).config
    assert (cfg.sliding_window, cfg.max_seq_len) == (128, 512)


def test_a_window_on_some_layers_caps_the_context(tmp_path):
    write_hf_folder(tmp_path, "qwen2", tie=True, use_sliding_window=True, sliding_window=128, max_window_layers=1)
    cfg = load_hf_folder(tmp_path).config
    assert (cfg.sliding_window, cfg.max_seq_len) == (0, 128)  # exact within the window


def test_llama_attention_and_mlp_biases_load(tmp_path):
    """Granite code 3B/8B are llama checkpoints with biases on every projection."""
    hf_model = write_hf_folder(tmp_path, "llama", tie=True, attention_bias=True, mlp_bias=True)
    source = load_hf_folder(tmp_path)
    assert source.config.qkv_bias and source.config.wo_bias and source.config.mlp_bias
    ids = source.tokenizer.encode(PROMPT)
    with torch.no_grad():
        got = build_torch_model(source)(torch.tensor([ids]))[0].numpy()
    assert np.abs(got - _hf_logits(hf_model, ids)).max() < 1e-4


def test_pickle_checkpoint_is_refused(tmp_path):
    write_hf_folder(tmp_path, "qwen2", tie=True)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
                                     {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}])
def test_unsupported_rope_scaling_is_a_clear_error(tmp_path, scaling):
    write_hf_folder(tmp_path, "llama", tie=False)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta.pop("rope_theta", None)
    meta["rope_parameters"] = scaling
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="rope scaling"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_linear_rope_scaling_matches_transformers(tmp_path, runtime):
    """DeepSeek-Coder 1.3B/6.7B/33B are llama checkpoints with linear RoPE scaling (factor 4)."""
    hf_model = write_hf_folder(tmp_path, "llama", tie=False, rope_theta=100000.0,
                               rope_scaling={"rope_type": "linear", "factor": 4.0})
    rt = load_runtime(str(tmp_path), runtime=runtime, precision="fp32")
    assert (rt.config.rope_linear_factor, rt.config.rope_theta) == (4.0, 100000.0)
    ids = rt.tokenizer.encode(PROMPT)
    want = _hf_logits(hf_model, ids)
    _, last = rt.prefill(ids)
    assert np.abs(last - want[-1]).max() < 1e-4


def test_old_style_rope_theta_is_read(tmp_path):
    write_hf_folder(tmp_path, "qwen2", tie=True)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta.pop("rope_parameters", None)
    meta.update(rope_theta=1000000.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert load_hf_folder(tmp_path).config.rope_theta == 1e6


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    with pytest.raises(ModelLoadError, match="gpt_bigcode"):
        load_model_source(tmp_path)
