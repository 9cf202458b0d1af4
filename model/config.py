"""Configuration of the decoder-only transformer, its named presets and its parameter count.

The vocabulary size is not known here: it comes from the tokenizer, so presets leave it out and
the caller fills it in (`preset("default", vocab_size=tokenizer.vocab_size)`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def _swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden size: 8/3·dim keeps the parameter count of a 4·dim GELU MLP (Shazeer 2020),
    rounded up to a multiple of 64 so the GEMMs tile well."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class ModelConfig:
    """Hyper-parameters of `model.Transformer`. Every field travels inside checkpoints (`to_dict`)."""

    vocab_size: int  # number of token ids (text BPE + image codes + specials), from the tokenizer
    block_size: int = 512  # maximum sequence length: size of the RoPE tables and of the KV cache
    n_layer: int = 8  # number of transformer blocks
    n_head: int = 4  # attention heads for queries
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None means n_head
    dim: int = 256  # width of the residual stream
    ffn_hidden: int | None = None  # SwiGLU hidden width; None derives ~8/3·dim rounded up to 64
    rope_base: float = 10_000.0  # RoPE frequency base (Su et al. 2021, "RoFormer")
    norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    # Chameleon (Team 2024, §2.3): normalising queries and keys over head_dim bounds the attention
    # logits and stopped the norm growth that made mixed-modal training diverge
    qk_norm: bool = True
    # Chameleon-34B / Swin-v2 norm placement: h = x + norm(attn(x)), out = h + norm(ffn(h)),
    # instead of pre-norm h = x + attn(norm(x)); Chameleon needed it at 34B for stability
    norm_reorder: bool = False
    # coefficient of the z-loss z·mean(logsumexp(logits)²) that keeps the softmax normaliser near 1
    # (PaLM, Chowdhery et al. 2022; Chameleon uses 1e-5 against logit drift)
    z_loss: float = 1e-5
    init_std: float = 0.02  # std of the normal weight init (GPT-2); also avoids float32 denormals
    tie_embeddings: bool = False  # share the token embedding with the output head
    dropout: float = 0.0  # dropout on attention probabilities and residual branches (training only)
    # learned embeddings of a code's place in its image (0 = none, else the codes per image): added
    # to the code's token embedding, as DALL-E's row/column embeddings (Ramesh et al. 2021) give the
    # model each code's absolute grid position, which rotary positions give only relative to <boi>
    image_pos_emb: int = 0

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = _swiglu_hidden(self.dim)
        self.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head: dim // n_head."""
        return self.dim // self.n_head

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "dim", "ffn_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_head != 0:
            raise ValueError(
                f"dim={self.dim} is not divisible by n_head={self.n_head}: pick n_head dividing dim "
                f"(e.g. n_head={max(1, self.dim // 64)} for head_dim 64)"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = dim/n_head = {self.head_dim} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                "each key/value head must serve a whole group of query heads"
            )
        if not isinstance(self.image_pos_emb, int) or self.image_pos_emb < 0:
            raise ValueError(f"image_pos_emb must be 0 (off) or the number of codes per image, got {self.image_pos_emb!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_base <= 0 or self.init_std <= 0:
            raise ValueError(
                f"norm_eps, rope_base and init_std must be positive, got "
                f"{self.norm_eps}, {self.rope_base}, {self.init_std}"
            )
        if self.z_loss < 0:
            raise ValueError(f"z_loss is a non-negative coefficient, got {self.z_loss}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field (derived ones included, so a checkpoint is exact)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config from `to_dict()` output; unknown keys raise ValueError (a typo fails loudly)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig key(s) {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)


# Presets: keyword arguments without vocab_size (it comes from the tokenizer). The parameter counts
# in the comments are num_params() at vocab_size=65_536 (tests/test_model.py checks them within 10%).
PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~0.1 M parameters in the blocks, plus 2·vocab·64 in embedding and head
    "tiny": dict(block_size=64, n_layer=2, n_head=4, dim=64),
    # the 2-core CPU default: 8.7 M parameters at vocab 4,512 (6.4 M in the blocks); training
    # step at batch 16 × seq 256, bf16 autocast + compile: ~5.1k tokens/s on one busy-machine
    # thread (bench/bench_train.py), so ~4 M tokens in a 12-minute run
    "default": dict(block_size=512, n_layer=8, n_head=4, dim=256),
    # GPU presets; at vocab 65,536 the embedding and head dominate the small ones
    "small": dict(block_size=2048, n_layer=12, n_head=8, dim=512),  # 106 M
    "medium": dict(block_size=2048, n_layer=16, n_head=16, dim=1024),  # 337 M
    "large": dict(block_size=4096, n_layer=16, n_head=16, n_kv_head=8, dim=2048),  # 1.01 B
}

# the annotated counts above, for the test
PRESET_PARAMS_AT_65536: dict[str, float] = {"small": 106e6, "medium": 337e6, "large": 1.01e9}


def preset(name: str, *, vocab_size: int, **overrides: Any) -> ModelConfig:
    """The named preset with the tokenizer's vocab_size and optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides, "vocab_size": vocab_size})


def num_params(config: ModelConfig) -> int:
    """Parameter count of `Transformer(config)` computed from the config alone (no allocation)."""
    d, hd = config.dim, config.head_dim
    attn = d * (config.n_head + 2 * config.n_kv_head) * hd + config.n_head * hd * d
    qk_norm = 2 * hd if config.qk_norm else 0
    mlp = 3 * d * config.ffn_hidden
    per_layer = attn + qk_norm + mlp + 2 * d  # two RMSNorm weights
    embed = (config.vocab_size + config.image_pos_emb) * d
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return embed + config.n_layer * per_layer + d + head  # + final norm
