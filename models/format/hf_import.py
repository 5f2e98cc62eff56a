"""Import a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) of the
Llama, Qwen2, Mistral, StarCoder2, Gemma or Granite family as a ModelSource with our parameter
names.

Every family uses the same half-split RoPE layout as models/model.py, so q/k weights load
unpermuted. What differs is a ModelConfig field each (hf_model_config): StarCoder2 has
LayerNorm with a bias, a GELU MLP without a gate and biases everywhere; Gemma a GeGLU MLP,
embeddings scaled by sqrt(dim) and RMSNorm by (1 + weight), which is stored here as the
plain RMSNorm weight 1 + weight (llama.cpp's converter does the same); Granite is Llama with
four multipliers (embeddings, attention scores, residual branches, logits). Weights come from
safetensors only; pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .folder import ModelLoadError, param_shapes, read_safetensors
from .source import ModelSource

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "starcoder2", "gemma", "granite")
MAX_SEQ_LEN_CAP = 32768  # longer contexts than this are not useful for completion on a laptop

# FIM sentinels of public code models, all trained prefix-suffix-middle (PSM):
# (prefix, suffix, middle, pad, file separator)
FIM_FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>"),  # Qwen2.5-Coder
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", None, "<|file_separator|>"),  # CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<file_sep>"),  # StarCoder, StarCoder2
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None, None),  # DeepSeek-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>", None, None),  # CodeLlama
)
# Tokens after which a completion must stop, wherever a vocabulary has them.
STOP_TOKENS = (
    "<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>",  # Qwen
    "<fim_pad>", "<file_sep>",  # StarCoder
    "<|file_separator|>", "<end_of_turn>",  # CodeGemma
    "<|EOT|>", "<｜end▁of▁sentence｜>",  # DeepSeek-Coder
    "▁<EOT>",  # CodeLlama
    "<|eot_id|>", "<|end_of_text|>",  # Llama 3
)

_LAYER_PARTS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.c_fc": "feed_forward.w3",  # StarCoder2's ungated MLP: up
    "mlp.c_proj": "feed_forward.w2",  # and down
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "model.norm.bias": "norm.bias",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")  # buffers some old checkpoints saved


@dataclass
class TokenFacts:
    """The token ids a ModelConfig needs, found in a vocabulary."""

    bos_id: int = -1
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = -1
    fim_prefix_id: int = -1
    fim_suffix_id: int = -1
    fim_middle_id: int = -1
    fim_pad_id: int = -1
    file_sep_id: int = -1
    fim_order: str = "psm"

    def config_fields(self) -> dict:
        return dict(self.__dict__)

    def ids(self) -> set[int]:
        """Every token id these facts name."""
        return {self.bos_id, self.pad_id, self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id,
                self.fim_pad_id, self.file_sep_id, *self.eos_ids} - {-1}

    def named_specials(self, vocab: dict[str, int]) -> dict[str, int]:
        """Text -> id of every token these facts name (for Tokenizer's special_tokens)."""
        ids = self.ids()
        return {text: i for text, i in vocab.items() if i in ids}


def find_token_facts(vocab: dict[str, int], eos_ids: list[int], bos_id: int = -1,
                     pad_id: int = -1) -> TokenFacts:
    """FIM sentinels and stop tokens by their text, plus the given EOS/BOS/pad ids."""
    facts = TokenFacts(bos_id=bos_id, pad_id=pad_id)
    # the family whose every named token is there (CodeGemma and Qwen share three), else the
    # first whose three FIM tokens are
    found = [row for row in FIM_FAMILIES if all(t in vocab for t in row[:3])]
    complete = [row for row in found if all(t in vocab for t in row[3:] if t)]
    if found:
        prefix, suffix, middle, pad, file_sep = (complete or found)[0]
        facts.fim_prefix_id, facts.fim_suffix_id, facts.fim_middle_id = vocab[prefix], vocab[suffix], vocab[middle]
        facts.fim_pad_id = vocab.get(pad, -1) if pad else -1
        facts.file_sep_id = vocab.get(file_sep, -1) if file_sep else -1
    stops = [i for i in eos_ids if i >= 0] + [vocab[t] for t in STOP_TOKENS if t in vocab]
    facts.eos_ids = list(dict.fromkeys(stops))  # ordered, no duplicates
    return facts


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e


def _rope_theta_and_max_len(meta: dict, max_len: int) -> tuple[float, int, float]:
    """rope_theta, max_seq_len after scaling rules, and the linear scaling factor (1: none);
    unsupported scaling is an error."""
    params = meta.get("rope_parameters") or {}  # transformers >= 5 keeps rope facts here
    theta = float(meta.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = meta.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    factor = float(scaling.get("factor") or 1.0)
    if kind == "default":
        return theta, max_len, 1.0
    if kind == "linear":  # DeepSeek-Coder 1.3B/6.7B/33B: factor 4 over 16k positions
        return theta, max_len, factor
    if kind == "dynamic":  # dynamic NTK changes nothing up to the original length
        original = scaling.get("original_max_position_embeddings") or meta.get("max_position_embeddings")
        return theta, min(max_len, int(original or max_len)), 1.0
    raise ModelLoadError(f"rope scaling {kind!r} (factor {factor}) is not supported yet; "
                         "models/model.py implements plain and linearly scaled RoPE only")


def _sliding_window(meta: dict) -> tuple[int, bool]:
    """(the attention window or 0, whether every layer uses it). transformers' rule: Mistral
    and StarCoder2 window every layer when `sliding_window` is set; Qwen2 only with
    use_sliding_window, from layer max_window_layers on; `layer_types` says it per layer."""
    window = int(meta.get("sliding_window") or 0)
    if not window:
        return 0, False
    n_layers = int(meta["num_hidden_layers"])
    layer_types = meta.get("layer_types")
    if layer_types:
        sliding = [t == "sliding_attention" for t in layer_types]
    elif meta.get("model_type") in ("mistral", "starcoder2"):
        sliding = [True] * n_layers
    elif meta.get("use_sliding_window"):
        first = int(meta.get("max_window_layers") or 0)
        sliding = [i >= first for i in range(n_layers)]
    else:
        sliding = [False] * n_layers
    if not any(sliding):
        return 0, False
    return window, all(sliding)


# transformers' activation names -> ModelConfig.activation
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _activation(meta: dict) -> str:
    model_type = meta.get("model_type")
    act = meta.get("hidden_activation") or meta.get("hidden_act") or "silu"
    if model_type == "gemma" and act == "gelu":  # transformers' rule: Gemma's "gelu" means the tanh approximation
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    kind = _ACTIVATIONS[act]
    if model_type in ("llama", "qwen2", "mistral", "granite") and kind != "silu":
        raise ModelLoadError(f"hidden_act {act!r} on a {model_type} model is not supported (SwiGLU with silu only)")
    return kind


def _family_fields(meta: dict) -> dict:
    """The ModelConfig fields that say how this model_type's blocks are built."""
    model_type = meta["model_type"]
    if model_type == "starcoder2":
        bias = bool(meta.get("use_bias", True))
        return dict(norm_kind="layer", mlp_gated=False, qkv_bias=bias, wo_bias=bias, mlp_bias=bias,
                    norm_eps=float(meta.get("norm_epsilon", 1e-5)))
    if model_type == "qwen2":
        return dict(qkv_bias=True)
    fields = dict(qkv_bias=bool(meta.get("attention_bias")), wo_bias=bool(meta.get("attention_bias")),
                  mlp_bias=bool(meta.get("mlp_bias")))  # llama's optional biases (Granite code), Gemma's attention ones
    if model_type == "gemma":
        fields["embedding_scale"] = float(meta["hidden_size"]) ** 0.5
        fields["mlp_bias"] = False
    if model_type == "granite":
        fields.update(embedding_scale=float(meta.get("embedding_multiplier", 1.0)),
                      attention_scale=float(meta.get("attention_multiplier", 1.0)),
                      residual_scale=float(meta.get("residual_multiplier", 1.0)),
                      logits_divisor=float(meta.get("logits_scaling", 1.0)))
    return fields


# model_type -> added to the stored norm weights: Gemma's RMSNorm scales by (1 + weight)
NORM_WEIGHT_OFFSET = {"gemma": 1.0}


def hf_model_config(meta: dict, vocab_size: int, facts: TokenFacts) -> ModelConfig:
    """Map an HF config.json (SUPPORTED_MODEL_TYPES) to our ModelConfig."""
    model_type = meta.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model_type {model_type!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    n_heads = int(meta["num_attention_heads"])
    dim = int(meta["hidden_size"])
    max_len = int(meta.get("max_position_embeddings") or 4096)
    theta, max_len, rope_factor = _rope_theta_and_max_len(meta, max_len)
    window, every_layer = _sliding_window(meta)
    if window and not every_layer:  # some layers windowed, some not: a context within the window is exact
        max_len, window = min(max_len, window), 0
    fields = {"norm_eps": float(meta.get("rms_norm_eps", 1e-6)), "activation": _activation(meta),
              **_family_fields(meta)}
    return ModelConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(meta["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("num_key_value_heads") or n_heads),
        head_dim=int(meta.get("head_dim") or dim // n_heads),
        ffn_dim=int(meta["intermediate_size"]),
        max_seq_len=min(max_len, MAX_SEQ_LEN_CAP),
        rope_theta=theta,
        rope_linear_factor=rope_factor,
        tie_embeddings=bool(meta.get("tie_word_embeddings", model_type in ("gemma", "starcoder2"))),
        sliding_window=window if window < min(max_len, MAX_SEQ_LEN_CAP) else 0,
        align_back_off="fixed",  # see ModelConfig.align_back_off
        **fields,
        **facts.config_fields(),
    )


def our_param_name(hf_name: str) -> str | None:
    """Our parameter name for an HF tensor name (None: not a weight we know)."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    return None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the shard index's files, model.safetensors, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards named in {index.name} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise ModelLoadError(
            f"{folder}: only pickle weights (pytorch_model.bin / .pt); codecomplete never loads pickle. "
            "Convert them to safetensors first (transformers: save_pretrained(dir, safe_serialization=True)).")
    raise ModelLoadError(f"{folder}: no *.safetensors weights")


def load_hf_weights(folder: Path, cfg: ModelConfig, model_type: str = "llama") -> dict[str, np.ndarray]:
    """float32 weights under our names, checked against the config's shapes."""
    out: dict[str, np.ndarray] = {}
    unknown = []
    for path in safetensors_files(folder):
        for hf_name, arr in read_safetensors(path).items():
            name = our_param_name(hf_name)
            if name is None:
                if not _IGNORED_RE.fullmatch(hf_name):
                    unknown.append(hf_name)
                continue
            out[name] = np.asarray(arr, dtype=np.float32)
            if name.endswith("norm.weight") and model_type in NORM_WEIGHT_OFFSET:
                out[name] = out[name] + np.float32(NORM_WEIGHT_OFFSET[model_type])
    if unknown:
        raise ModelLoadError(f"{folder}: tensors this importer does not know: {', '.join(unknown[:5])}")
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # some tied checkpoints store the copy anyway
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"{folder}: weights do not match config.json "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for name, shape in expected.items():
        if out[name].shape != shape:
            raise ModelLoadError(f"{folder}: {name} has shape {out[name].shape}, config says {shape}")
    return out


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def find_bos_id(hf_tokenizer, tokenizer_config: dict) -> int:
    """The BOS id the model expects in front of every prompt, or -1."""
    probe = "a"
    with_special = hf_tokenizer.encode(probe, add_special_tokens=True).ids
    plain = hf_tokenizer.encode(probe, add_special_tokens=False).ids
    if len(with_special) > len(plain) and with_special[1:len(plain) + 1] == plain:
        return with_special[0]  # the post-processor prepends it (Llama 3 style)
    if tokenizer_config.get("add_bos_token"):
        bos = _token_text(tokenizer_config.get("bos_token"))
        idx = hf_tokenizer.token_to_id(bos) if bos else None
        if idx is not None:
            return idx
    return -1


def pad_tokenizer_to(hf_tokenizer, vocab_size: int) -> None:
    """Add special placeholder tokens so that every model id has a tokenizer entry
    (Qwen's embedding has ~270 rows beyond its tokenizer)."""
    from tokenizers import AddedToken

    have = hf_tokenizer.get_vocab_size(with_added_tokens=True)
    if have < vocab_size:
        hf_tokenizer.add_special_tokens([AddedToken(f"<|unused_{i}|>", special=True, normalized=False)
                                         for i in range(have, vocab_size)])


def load_hf_tokenizer(folder: Path, vocab_size: int, eos_ids: list[int], pad_id: int):
    """(Tokenizer, TokenFacts) from tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer

    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        hint = " (only a SentencePiece tokenizer.model: save it once with transformers' " \
               "AutoTokenizer(...).save_pretrained to get tokenizer.json)" if (folder / "tokenizer.model").is_file() else ""
        raise ModelLoadError(f"{folder}: no tokenizer.json{hint}")
    hf_tok = HFTokenizer.from_file(str(tok_file))
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    if pad_id < 0:
        pad_text = _token_text(tok_cfg.get("pad_token"))
        pad_id = vocab.get(pad_text, -1) if pad_text else -1
    eos_text = _token_text(tok_cfg.get("eos_token"))
    if eos_text in vocab:
        eos_ids = [*eos_ids, vocab[eos_text]]
    facts = find_token_facts(vocab, eos_ids, find_bos_id(hf_tok, tok_cfg), pad_id)
    pad_tokenizer_to(hf_tok, vocab_size)
    return Tokenizer(hf_tok, special_tokens=facts.named_specials(vocab)), facts


def load_hf_folder(path: str | Path) -> ModelSource:
    """A Hugging Face folder (SUPPORTED_MODEL_TYPES) as a float32 ModelSource."""
    folder = Path(path)
    meta = _read_json(folder / "config.json")
    if not meta:
        raise ModelLoadError(f"{folder}: no config.json")
    if meta.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{folder}: model_type {meta.get('model_type')!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    gen = _read_json(folder / "generation_config.json")
    eos_ids = _as_id_list(gen.get("eos_token_id")) + _as_id_list(meta.get("eos_token_id"))
    pad_ids = _as_id_list(gen.get("pad_token_id")) or _as_id_list(meta.get("pad_token_id"))
    vocab_size = int(meta["vocab_size"])
    tokenizer, facts = load_hf_tokenizer(folder, vocab_size, eos_ids, pad_ids[0] if pad_ids else -1)
    cfg = hf_model_config(meta, vocab_size, facts)
    weights = load_hf_weights(folder, cfg, meta["model_type"])
    return ModelSource(folder.name, cfg, tokenizer, weights, "none", str(folder))
