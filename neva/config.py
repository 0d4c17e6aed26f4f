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

    kind: str = "llama3"                 # llama3 (frequency bands, Llama-3.1) | linear (positions / factor)
    factor: float = 8.0                  # how much longer the context gets
    low_freq_factor: float = 1.0         # llama3: wavelengths above original_max_position / this are scaled
    high_freq_factor: float = 4.0        # llama3: wavelengths below original_max_position / this are kept
    original_max_position: int = 8192    # llama3: the context length the model was trained at


@dataclass(frozen=True)
class VisionConfig:
    """The image encoder: a ViT (or a fusion of several) that turns each image (or video frame) into
    patch features."""

    kind: str = "siglip"                 # a registered encoder: clip (class token, pre-LN) | siglip | dino | fused | yours
    image_size: int = 384                # input side in pixels (images are resized to it)
    patch_size: int = 14                 # patch side in pixels: (image_size / patch_size)^2 patches
    dim: int = 1152                      # hidden size (fused: the sum of the towers')
    n_layers: int = 27                   # transformer layers
    n_heads: int = 16                    # attention heads (must divide dim)
    mlp_dim: int = 4304                  # MLP inner size
    eps: float = 1e-6                    # LayerNorm epsilon
    act: str = "gelu_tanh"               # MLP activation: gelu_tanh (SigLIP) | quick_gelu (CLIP) | gelu
    select_layer: int = -2               # index into HF hidden_states (0 = embeddings, -1 = last layer)
    select_feature: str = "patch"        # patch (patch tokens only) | cls_patch (CLIP: the class token too)
    from_pretrained: str | None = None   # HF CLIP / SigLIP / DINOv2 folder
    n_registers: int = 0                 # dino: register tokens after the class token (DINOv2 with registers)
    pos_image_size: int | None = None    # dino: the image size the position table was trained at (None: image_size);
                                         # another image_size resamples it bicubically, as HF does
    towers: tuple[VisionConfig, ...] = ()  # fused: the encoders whose patch features are concatenated (``fuse``)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def parts(self) -> tuple[VisionConfig, ...]:
        """The encoders that run: a fused encoder's towers, else this one."""
        return self.towers or (self,)

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
    """The projector: encoder features -> LLM-sized media tokens."""

    kind: str = "mlp2x_gelu"             # a registered projector: linear | mlp{N}x_gelu | mlp_downsample | identity
    bias: bool = True                    # linear layers with a bias
    frame_pool: int = 1                  # average-pool each video frame's token grid by this stride after the
                                         # projector (LLaVA-NeXT-Video's mm_spatial_pool_stride=2: 4x fewer tokens)


@dataclass(frozen=True)
class LLMConfig:
    """The decoder LLM that reads text and media tokens (one trunk, configured per family)."""

    kind: str = "llama"                  # llama | mistral | mixtral | nemotron (one decoder, configured)
    vocab_size: int = 32000              # embedding and LM-head rows (the image token included)
    dim: int = 4096                      # hidden size
    n_layers: int = 32                   # decoder layers
    n_heads: int = 32                    # query heads
    n_kv_heads: int = 8                  # key/value heads (GQA; must divide n_heads)
    head_dim: int | None = None          # default dim // n_heads
    ffn_dim: int = 14336                 # MLP inner size (each expert's, with n_experts)
    mlp: str = "swiglu"                  # a registered FFN: swiglu | relu2 | gelu | gelu_tanh (n_experts > 0: moe)
    norm: str = "rms"                    # rms | layernorm1p
    eps: float = 1e-5                    # norm epsilon
    rope_theta: float = 10000.0          # rotary base
    rope_scaling: RopeScaling | None = None  # long-context rotary scaling (none = off)
    rotary_pct: float = 1.0              # fraction of each head rotated (Nemotron: 0.5)
    sliding_window: int | None = None    # Mistral: a query sees this many keys, itself included
    tie_embeddings: bool = False         # the LM head reuses the embedding matrix
    max_position: int = 4096             # the longest sequence (rotary tables and generation)
    n_experts: int = 0                   # > 0: MoE MLP (Mixtral)
    top_k: int = 2                       # experts each token is routed to
    aux_loss_coef: float = 0.01          # Switch load-balancing loss weight
    z_loss_coef: float = 0.0             # router z-loss weight
    init_std: float = 0.02               # std of the normal init (output projections scaled by depth)
    bos_id: int | None = 1               # beginning-of-sequence token
    eos_id: int | None = 2               # end-of-sequence token: generation stops at it
    pad_id: int | None = None            # left padding of prompts in generation (none: eos_id, else 0)
    from_pretrained: str | None = None   # HF Llama / Mistral / Mixtral / Nemotron folder

    @property
    def generation_pad_id(self) -> int:
        """The id prompts are left-padded with in generation: pad_id, else eos_id, else 0."""
        return self.pad_id if self.pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

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
    """A NeVA: vision encoder -> projector -> media tokens spliced into the LLM's token stream."""

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
        _check_towers(v)
        for i, t in enumerate(v.parts):
            _check_vit(t, f"model.vision.towers.{i}" if v.towers else "model.vision")
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


def _check_vit(v: VisionConfig, key: str) -> None:
    if v.towers:
        raise ValueError(f"{key}: a tower cannot itself have towers (kind={v.kind!r})")
    ENCODERS[v.kind]                                          # raises, naming every registered part
    if v.image_size < v.patch_size:
        raise ValueError(f"{key}.image_size={v.image_size} is smaller than patch_size={v.patch_size}")
    if v.dim % v.n_heads:
        raise ValueError(f"{key}.dim={v.dim} does not divide into n_heads={v.n_heads}")
    if not -v.n_layers - 1 <= v.select_layer <= v.n_layers:
        raise ValueError(f"{key}.select_layer={v.select_layer} out of range for {v.n_layers} layers")
    if v.select_feature not in ("patch", "cls_patch"):
        raise ValueError(f"{key}.select_feature={v.select_feature!r}: use patch or cls_patch")
    if v.kind in ("clip", "siglip") and (v.n_registers or v.pos_image_size not in (None, v.image_size)):
        raise ValueError(f"{key}: n_registers and pos_image_size are DINOv2's (kind=dino); {v.kind} has "
                         f"neither (its position table is image_size {v.image_size})")
    if v.n_registers < 0:
        raise ValueError(f"{key}.n_registers={v.n_registers} must be >= 0")


def _check_towers(v: VisionConfig) -> None:
    """A fused encoder: two or more towers of different kinds (their params live at vision/<kind>/),
    and ``dim`` the width of the concatenated features. Whether their grids agree is the encoder's
    ``tokens`` to say (``neva/fused.py``)."""
    if v.kind == "fused" and len(v.towers) < 2:
        raise ValueError("model.vision.kind=fused needs two or more towers (model.vision.towers): build the config "
                         "with neva.config.fuse(tower, tower, ...) in an experiment file (experiments/fused_dino_siglip.py)")
    if not v.towers:
        return
    kinds = [t.kind for t in v.towers]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"model.vision.towers have kinds {kinds}: each kind at most once (a tower's params and "
                         f"pixel_values are keyed by its kind)")
    if v.dim != sum(t.dim for t in v.towers):
        raise ValueError(f"model.vision.dim={v.dim} must be the width of the concatenated features, the towers' "
                         f"dims {' + '.join(str(t.dim) for t in v.towers)} = {sum(t.dim for t in v.towers)}")


def fuse(*towers: VisionConfig) -> VisionConfig:
    """A fused encoder (Prismatic's DINOv2 + SigLIP): every tower sees the image through its own
    preprocessing and their patch features are concatenated per patch, ``dim`` = the towers' total.
    The fused config's grid is the first tower's; its own layer fields are unused (n_layers=0)."""
    t0 = towers[0]
    return VisionConfig(kind="fused", towers=tuple(towers), dim=sum(t.dim for t in towers), image_size=t0.image_size,
                        patch_size=t0.patch_size, n_layers=0, n_heads=1, mlp_dim=0, select_layer=0)


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


def dinov2_l14_reg_224() -> VisionConfig:
    """DINOv2 ViT-L/14 with 4 registers (facebook/dinov2-with-registers-large), position table at 518
    px resampled to 224 px images (16 x 16 patches): Prismatic's DINO tower."""
    return VisionConfig(kind="dino", image_size=224, patch_size=14, dim=1024, n_layers=24, n_heads=16,
                        mlp_dim=4096, eps=1e-6, act="gelu", n_registers=4, pos_image_size=518)


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
VISION_PRESETS = {"clip": clip_vit_l14_336, "siglip": siglip_so400m_384, "dino": dinov2_l14_reg_224}


def tiny_llm(kind: str = "mixtral", **kw) -> LLMConfig:
    """A few-layer version of a preset for tests and CPU runs."""
    small = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None, ffn_dim=128,
                 max_position=512)
    if kind == "mixtral":
        small.update(n_experts=4, top_k=2)
    cfg = replace(LLM_PRESETS[kind](), **small)
    return replace(cfg, **kw)


def tiny_vision(kind: str = "siglip", **kw) -> VisionConfig:
    small = dict(image_size=32, patch_size=8, dim=48, n_layers=3, n_heads=4, mlp_dim=96)
    if kind == "dino":                   # a 5x5 position table resampled to the 4x4 grid, one register
        small.update(pos_image_size=40, n_registers=1)
    return replace(replace(VISION_PRESETS[kind](), **small), **kw)
