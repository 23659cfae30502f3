"""The model's shape, read from a Hugging Face `config.json`.

Only what changes the computation is kept. Settings this implementation does not reproduce
(rope scaling, sliding windows, other activations) are refused rather than silently ignored:
a model that loads but computes something else is the worst kind of bug.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.cli import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # q/k/v bias: always on for Qwen2; a flag for Llama, where it covers o_proj too
    model_type: str = "qwen2"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 has q/k/v biases but none on o_proj; Llama's `attention_bias` puts one on all four."""
        return self.attention_bias and self.model_type == "llama"

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Translate a transformers config dict (v4 or v5 layout) into ours, refusing what we can't run."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type {model_type!r} is not supported; this codebase runs {' and '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise UserError("mlp_bias=true is not supported (Qwen2/Llama MLPs have no bias)")
        if hf.get("use_sliding_window"):
            raise UserError("use_sliding_window=true is not supported (full attention only)")
        # transformers v5 folds rope_theta into `rope_parameters`; v4 has `rope_theta` and `rope_scaling`.
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if hf.get("rope_scaling") is not None or rope_type != "default":
            raise UserError(f"rope scaling ({hf.get('rope_scaling') or rope}) is not supported; only plain RoPE")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        try:
            n_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or hidden // n_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type != "llama")),
                attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
                model_type=model_type,
            )
        except KeyError as e:
            raise UserError(f"config.json lacks the required field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """A config.json that transformers (v4 and v5) and this codebase both read back."""
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
        else:
            hf["use_sliding_window"] = False
        return hf
