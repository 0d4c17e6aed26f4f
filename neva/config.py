"""Model configs: frozen dataclasses, composed by name.

A NeVA is ``ModelConfig(vision=VisionConfig, projector=ProjectorConfig, llm=LLMConfig)``. Backbones
are configs of one decoder function (``neva/llm.py``); the presets below give the published shapes
and ``tiny()`` shrinks any of them for tests. Swap a part with ``dataclasses.replace``; ``kind``
strings name parts in ``neva.registry`` (where an experiment registers its own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from neva.registry import ENCODERS, FFNS, PROJECTORS

LLM_KINDS = ("llama", "mistral", "mixtral", "nemotron")   # HF families; the compute is one decoder


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling (``rope_type: llama3``) or ``linear`` position scaling."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class VisionConfig:
    kind: str = "siglip"                 # a registered encoder: clip (class token, pre-LN) | siglip | yours
    image_size: int = 384
    patch_size: int = 14
    dim: int = 1152
    n_layers: int = 27
    n_heads: int = 16
    mlp_dim: int = 4304
    eps: float = 1e-6
    act: str = "gelu_tanh"
    select_layer: int = -2               # index into HF hidden_states (0 = embeddings, -1 = last layer)
    select_feature: str = "patch"        # patch | cls_patch
    from_pretrained: str | None = None   # HF CLIP / SigLIP folder

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def layers_used(self) -> int:
        """How many encoder layers run to reach ``select_layer``."""
        return self.select_layer if self.select_layer >= 0 else self.n_layers + 1 + self.select_layer

    @property
    def tokens_out(self) -> int:
        """Tokens per image leaving the encoder."""
        return ENCODERS[self.kind].tokens(self)


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "mlp2x_gelu"             # a registered projector: linear | mlp{N}x_gelu | mlp_downsample | identity
    bias: bool = True
    frame_pool: int = 1                  # average-pool each video frame's token grid by this stride after the
                                         # projector (LLaVA-NeXT-Video's mm_spatial_pool_stride=2: 4x fewer tokens)


@dataclass(frozen=True)
class LLMConfig:
    kind: str = "llama"                  # llama | mistral | mixtral | nemotron (one decoder, configured)
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None          # default dim // n_heads
    ffn_dim: int = 14336
    mlp: str = "swiglu"                  # a registered FFN: swiglu | relu2 | gelu | gelu_tanh (n_experts > 0: moe)
    norm: str = "rms"                    # rms | layernorm1p
    eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_pct: float = 1.0              # Nemotron rotates half of each head
    sliding_window: int | None = None    # Mistral: a query sees this many keys, itself included
    tie_embeddings: bool = False
    max_position: int = 4096
    n_experts: int = 0                   # > 0: MoE MLP (Mixtral)
    top_k: int = 2
    aux_loss_coef: float = 0.01          # Switch load-balancing loss weight
    z_loss_coef: float = 0.0             # router z-loss weight
    init_std: float = 0.02
    bos_id: int | None = 1
    eos_id: int | None = 2
    pad_id: int | None = None
    from_pretrained: str | None = None   # HF Llama / Mistral / Mixtral / Nemotron folder

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rot_dim(self) -> int:
        return int(self.hd * self.rotary_pct)

    @property
    def ffn(self) -> str:
        """The registered FFN each block runs: ``moe`` when there are experts, else ``mlp``."""
        return "moe" if self.n_experts else self.mlp


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token_id: int = 32000          # the placeholder id repeated tokens_per_image times per image
    moe_dispatch: str = "sorted"         # sorted (grouped by expert) | dense (every expert, for vmap)

    @property
    def tokens_per_image(self) -> int:
        """Media tokens one image becomes in the LLM sequence (a video frame too, unless pooled)."""
        return PROJECTORS[self.projector.kind].tokens(self.vision.tokens_out, self)

    @property
    def tokens_per_frame(self) -> int:
        """Media tokens one video frame becomes: the projector's grid average-pooled by
        ``projector.frame_pool`` (ceil: a last odd row and column of patches is pooled on its own)."""
        n, s = self.tokens_per_image, self.projector.frame_pool
        if s == 1:
            return n
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"model.projector.frame_pool={s} pools a square grid of tokens; the projector gives "
                             f"{n} per image (a class token? use model.vision.select_feature=patch)")
        return math.ceil(g / s) ** 2

    def validate(self) -> "ModelConfig":
        """Raise on a config that cannot build, naming the field and what would fit."""
        v, l, p = self.vision, self.llm, self.projector
        for registry, name in ((ENCODERS, v.kind), (PROJECTORS, p.kind), (FFNS, l.ffn)):
            registry[name]                                    # raises, naming every registered part
        if l.kind not in LLM_KINDS:
            raise ValueError(f"model.llm.kind={l.kind!r}: use one of {LLM_KINDS}")
        if v.image_size < v.patch_size:
            raise ValueError(f"model.vision.image_size={v.image_size} is smaller than patch_size={v.patch_size}")
        if v.dim % v.n_heads:
            raise ValueError(f"model.vision.dim={v.dim} does not divide into n_heads={v.n_heads}")
        if not -v.n_layers - 1 <= v.select_layer <= v.n_layers:
            raise ValueError(f"model.vision.select_layer={v.select_layer} out of range for {v.n_layers} layers")
        if v.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"model.vision.select_feature={v.select_feature!r}: use patch or cls_patch")
        if p.kind == "identity" and v.dim != l.dim:
            raise ValueError(f"projector identity needs vision dim == llm dim (got {v.dim} and {l.dim})")
        if p.frame_pool < 1:
            raise ValueError(f"model.projector.frame_pool={p.frame_pool} must be >= 1 (1 = no pooling)")
        _ = self.tokens_per_image, self.tokens_per_frame      # a projector that cannot take these tokens says so
        if l.n_heads % l.n_kv_heads:
            raise ValueError(f"model.llm.n_heads={l.n_heads} is not a multiple of n_kv_heads={l.n_kv_heads}")
        if l.head_dim is None and l.dim % l.n_heads:
            raise ValueError(f"model.llm.dim={l.dim} does not divide into n_heads={l.n_heads}; set head_dim")
        if l.rot_dim % 2:
            raise ValueError(f"rotary dims {l.rot_dim} (head_dim {l.hd} x rotary_pct {l.rotary_pct}) must be even")
        if l.n_experts and not 1 <= l.top_k <= l.n_experts:
            raise ValueError(f"model.llm.top_k={l.top_k} must be in [1, n_experts={l.n_experts}]")
        if not 0 <= self.image_token_id < l.vocab_size:
            raise ValueError(f"model.image_token_id={self.image_token_id} must be a token id below vocab_size={l.vocab_size}")
        if self.moe_dispatch not in ("sorted", "dense"):
            raise ValueError(f"model.moe_dispatch={self.moe_dispatch!r}: use sorted or dense")
        return self


# ------------------------------------------------------------------------------------ presets
def clip_vit_l14_336() -> VisionConfig:
    return VisionConfig(kind="clip", image_size=336, patch_size=14, dim=1024, n_layers=24, n_heads=16,
                        mlp_dim=4096, eps=1e-5, act="quick_gelu")


def siglip_so400m_384() -> VisionConfig:
    return VisionConfig(kind="siglip", image_size=384, patch_size=14, dim=1152, n_layers=27, n_heads=16,
                        mlp_dim=4304, eps=1e-6, act="gelu_tanh")


def llama2_7b() -> LLMConfig:
    return LLMConfig(kind="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     ffn_dim=11008, eps=1e-5, rope_theta=10000.0, max_position=4096)


def llama3_8b() -> LLMConfig:
    return LLMConfig(kind="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     ffn_dim=14336, eps=1e-5, rope_theta=500000.0, max_position=8192,
                     bos_id=128000, eos_id=128001)


def llama31_8b() -> LLMConfig:
    return replace(llama3_8b(), rope_scaling=RopeScaling(), max_position=131072)


def llama3_70b() -> LLMConfig:
    return replace(llama3_8b(), dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)


def mistral_7b() -> LLMConfig:
    return LLMConfig(kind="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     ffn_dim=14336, eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_position=32768)


def mixtral_8x7b() -> LLMConfig:
    return LLMConfig(kind="mixtral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     ffn_dim=14336, eps=1e-5, rope_theta=1e6, max_position=32768, n_experts=8, top_k=2,
                     aux_loss_coef=0.02)


def nemotron4_15b() -> LLMConfig:
    return LLMConfig(kind="nemotron", vocab_size=256000, dim=6144, n_layers=32, n_heads=48, n_kv_heads=8,
                     ffn_dim=24576, mlp="relu2", norm="layernorm1p", eps=1e-5, rope_theta=10000.0,
                     rotary_pct=0.5, max_position=4096, bos_id=2, eos_id=3)


LLM_PRESETS = {"llama2": llama2_7b, "llama3": llama3_8b, "llama3.1": llama31_8b, "llama3-70b": llama3_70b,
               "mistral": mistral_7b,
               "mixtral": mixtral_8x7b, "nemotron": nemotron4_15b}
VISION_PRESETS = {"clip": clip_vit_l14_336, "siglip": siglip_so400m_384}


def tiny_llm(kind: str = "mixtral", **kw) -> LLMConfig:
    """A few-layer version of a preset for tests and CPU runs."""
    small = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None, ffn_dim=128,
                 max_position=512)
    if kind == "mixtral":
        small.update(n_experts=4, top_k=2)
    cfg = replace(LLM_PRESETS[kind](), **small)
    return replace(cfg, **kw)


def tiny_vision(kind: str = "siglip", **kw) -> VisionConfig:
    cfg = replace(VISION_PRESETS[kind](), image_size=32, patch_size=8, dim=48, n_layers=3, n_heads=4, mlp_dim=96)
    return replace(cfg, **kw)
