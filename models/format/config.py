"""ModelConfig: the architecture and token facts of a model folder (no torch here)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

NORM_KINDS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@dataclass
class ModelConfig:
    vocab_size: int = 16384
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 0  # 0 means n_heads (multi-head attention)
    head_dim: int = 0  # 0 means dim // n_heads
    ffn_dim: int = 1408
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # linear RoPE scaling: positions divided by this (DeepSeek-Coder: 4)
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    tie_embeddings: bool = True
    # architecture variants of the families we import (hf_import / gguf_import map them)
    norm_kind: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with a bias: StarCoder2)
    mlp_gated: bool = True  # act(w1 x) * w3 x (SwiGLU, GeGLU); False: act(w3 x), no w1 (StarCoder2)
    activation: str = "silu"  # of the MLP: "silu", "gelu_tanh" (Gemma, StarCoder2) or "gelu" (erf)
    wo_bias: bool = False  # a bias on the attention output (StarCoder2, Granite code)
    mlp_bias: bool = False  # biases on every MLP layer (StarCoder2, Granite code)
    embedding_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(dim))
    attention_scale: float = 0.0  # attention scores are q.k times this; 0: 1 / sqrt(head_dim)
    residual_scale: float = 1.0  # attention and MLP outputs times this before each residual add (Granite)
    logits_divisor: float = 1.0  # the logits are divided by this (Granite's logits_scaling)
    sliding_window: int = 0  # a token attends to the last this-many positions, itself included; 0: all
    # rank r of a factorized tied embedding: the table is (vocab, r) and a projection
    # (r, dim) maps a row to the model width and, transposed, the final hidden state back
    # (logits = h·Bᵀ·Aᵀ); 0 means a full (vocab, dim) table. What lets a 152k-token
    # vocabulary fit a small model's budget
    embed_rank: int = 0
    # token facts
    bos_id: int = -1  # -1: the model uses no BOS
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = -1
    fim_prefix_id: int = -1
    fim_suffix_id: int = -1
    fim_middle_id: int = -1
    fim_pad_id: int = -1
    file_sep_id: int = -1
    fim_order: str = "spm"  # "spm" (suffix first) or "psm" (prefix first)
    # "spm" follows Bavarian et al.: <pre><suf> suffix <mid> prefix -> middle
    # how far token alignment backs off for this model (CompletionOptions.back_off_needed):
    # "needed" (only as far as a token could span the cursor) for models trained here, whose
    # FIM splits fall at any token boundary; "fixed" (the paper's k tokens) for imported
    # ones: Qwen2.5-Coder lost first-line exact match with "needed" (README)
    align_back_off: str = "fixed"

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.fim_order not in ("spm", "psm"):
            raise ValueError(f"fim_order must be 'spm' or 'psm', not {self.fim_order!r}")
        if self.embed_rank < 0 or (self.embed_rank and not self.tie_embeddings):
            raise ValueError(f"embed_rank {self.embed_rank}: a factorized embedding is a tied one, rank >= 0")
        if self.align_back_off not in ("needed", "fixed"):
            raise ValueError(f"align_back_off must be 'needed' or 'fixed', not {self.align_back_off!r}")
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind must be one of {', '.join(NORM_KINDS)}, not {self.norm_kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.rope_linear_factor <= 0:
            raise ValueError(f"rope_linear_factor must be positive, not {self.rope_linear_factor}")
        if self.attention_scale < 0 or self.residual_scale <= 0 or self.logits_divisor <= 0:
            raise ValueError("attention_scale must be >= 0 (0: 1 / sqrt(head_dim)), residual_scale and "
                             "logits_divisor positive")
        if self.sliding_window < 0:
            raise ValueError(f"sliding_window must be 0 (none) or positive, not {self.sliding_window}")

    @property
    def has_fim(self) -> bool:
        return min(self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id) >= 0

    @property
    def special_ids(self) -> set[int]:
        ids = {self.bos_id, self.pad_id, self.fim_prefix_id, self.fim_suffix_id,
               self.fim_middle_id, self.fim_pad_id, self.file_sep_id, *self.eos_ids}
        ids.discard(-1)
        return ids

    def n_params(self) -> int:
        """Parameters, counting a tied embedding once."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.wo_bias:
            attn += d
        ffn_in = 2 if self.mlp_gated else 1
        ffn = (ffn_in + 1) * d * self.ffn_dim
        if self.mlp_bias:
            ffn += ffn_in * self.ffn_dim + d
        norm = d * (2 if self.norm_kind == "layer" else 1)
        per_layer = attn + ffn + 2 * norm
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.embed_rank:
            emb = (self.vocab_size + d) * self.embed_rank
        return self.n_layers * per_layer + emb + norm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# Named presets (gpt-fast style). "default" is the shipped laptop model's shape.
PRESETS: dict[str, dict] = {
    "test-tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=176, max_seq_len=512),
    "small-21m": dict(vocab_size=16384, dim=384, n_layers=8, n_heads=6, ffn_dim=1024),
    "default": dict(vocab_size=16384, dim=576, n_layers=10, n_heads=9, ffn_dim=1536, max_seq_len=2048),
    "base-42m": dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, ffn_dim=1408),
    "7b-mha": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=16384),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], "align_back_off": "needed", **overrides})
