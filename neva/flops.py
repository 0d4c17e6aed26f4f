"""Model FLOPs of a forward pass, counted from the config (for MFU, as torchtitan and PaLM count them).

Only matrix products count (linears, the patch convolution, attention's two products), 2 FLOPs per
multiply-add, the way ``torch.utils.flop_counter.FlopCounterMode`` counts them, so a test can hold the
formula to the counter on a real forward. Conventions, stated because MFU figures differ by them:
attention scores count the full T x T (causal masking is not subtracted, as SDPA computes the whole
tile and FlopCounterMode counts it); MoE counts the ``top_k`` experts each token visits plus the router;
the LM head counts only the positions that carry a label (the model computes logits nowhere else);
vision counts the layers that run (``layers_used``). A training step is forward + backward = 3x forward.
"""
from __future__ import annotations

from math import prod

from neva.config import LLMConfig, ModelConfig, VisionConfig


def vision_flops(v: VisionConfig, n_images: int) -> int:
    """Patch embedding, then per layer q/k/v/o, the MLP and attention's QK^T and AV, for each image."""
    if v.towers:
        return sum(vision_flops(t, n_images) for t in v.towers)
    patches = (v.image_size // v.patch_size) ** 2
    extra = {"clip": 1, "dino": 1 + v.n_registers}.get(v.kind, 0)       # class and register tokens
    n, d = patches + extra, v.dim
    per_layer = 2 * n * (4 * d * d + 2 * d * v.mlp_dim) + 2 * 2 * n * n * d
    return n_images * (2 * patches * 3 * v.patch_size ** 2 * d + v.layers_used * per_layer)


def projector_flops(projector_weights: list[tuple[int, ...]], tokens: int) -> int:
    """2 x tokens x every weight matrix the projector applies to each output token."""
    return 2 * tokens * sum(prod(s) for s in projector_weights if len(s) == 2)


def llm_flops(c: LLMConfig, batch: int, seq: int, n_label: int) -> int:
    """Decoder layers over ``batch`` x ``seq`` tokens and the LM head at ``n_label`` positions."""
    hd = c.head_dim or c.dim // c.n_heads
    proj = 2 * c.dim * hd * (2 * c.n_heads + 2 * c.n_kv_heads)            # q, o and k, v
    gated = c.mlp == "swiglu" or c.n_experts > 0
    ffn = (3 if gated else 2) * 2 * c.dim * c.ffn_dim
    if c.n_experts:
        ffn = c.top_k * ffn + 2 * c.dim * c.n_experts                        # routed experts + router
    tokens = batch * seq
    per_layer = tokens * (proj + ffn) + batch * 2 * 2 * seq * seq * c.n_heads * hd
    return c.n_layers * per_layer + 2 * n_label * c.dim * c.vocab_size


def forward_flops(cfg: ModelConfig, projector_weights: list[tuple[int, ...]], *, batch: int, seq: int,
                  n_images: int, n_label: int) -> int:
    """One forward of the whole model: ``n_images`` images (or frames) through the tower and projector,
    ``batch`` x ``seq`` tokens through the LLM, logits at ``n_label`` positions."""
    return (vision_flops(cfg.vision, n_images) + projector_flops(projector_weights, n_images * cfg.tokens_per_image)
            + llm_flops(cfg.llm, batch, seq, n_label))


def train_flops(*args, **kw) -> int:
    """Forward + backward (the backward's two products per forward product): 3x ``forward_flops``."""
    return 3 * forward_flops(*args, **kw)
