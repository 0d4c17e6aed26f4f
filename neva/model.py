"""The NeVA composition: encode images, project, splice into the token embeddings, decode, loss.

``batch`` (all tensors; only ``input_ids`` is required):
  input_ids      int[B, T]   images already expanded: each image is ``tokens_per_image`` consecutive
                             ``image_token_id``s (as HF's LlavaProcessor does); a video is its frames
  pixel_values   float[N, 3, H, W]  the images (and video frames) in order of appearance, row-major
                             over the batch; absent or N = 0 for text-only batches
  labels         int[B, T]   aligned with input_ids (HF convention), -100 = not trained
  attention_mask int[B, T]   1 = token, 0 = padding (left or right)
  position_ids   int[B, T]   default: 0.. per row (from attention_mask when given)
  segment_ids    int[B, T]   packed samples: attention never crosses a change of id

Every function takes a ``Dist`` (default: one process); under a plan the params are local shards
and the collectives in the layers do the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import llm, projector, vision
from neva.config import ModelConfig
from neva.layers.attention import make_mask
from neva.layers.embedding import embed
from neva.layers.rope import cos_sin, inv_freq
from neva.loss import IGNORE, cross_entropy_sum, shift_labels
from neva.params import init as init_tree
from neva.parallel import comm
from neva.parallel.comm import LOCAL, Dist


def specs(cfg: ModelConfig) -> dict:
    cfg.validate()
    return {"vision": vision.specs(cfg.vision), "projector": projector.specs(cfg), "llm": llm.specs(cfg.llm)}


def init_params(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random params; each leaf depends only on (seed, its path)."""
    return init_tree(specs(cfg), seed, dtype)


def encode_images(params: dict, cfg: ModelConfig, pixel_values: Tensor, dist: Dist = LOCAL) -> Tensor:
    """float[N, 3, H, W] -> media embeddings [N, tokens_per_image, D_llm]."""
    dtype = params["llm"]["embed"]["w"].dtype
    feats = vision.apply(params["vision"], pixel_values.to(dtype), cfg.vision, dist.part("vision"))
    return projector.apply(params["projector"], feats, cfg, dist.part("projector"))


def check_media(ids_bt: Tensor, n_images: int, cfg: ModelConfig) -> None:
    """Raise unless the image tokens of each sample come in whole images and match pixel_values."""
    per = cfg.tokens_per_image
    counts = (ids_bt == cfg.image_token_id).sum(1).tolist()
    for b, c in enumerate(counts):
        if c % per:
            raise ValueError(f"sample {b} of the batch has {c} image tokens (id {cfg.image_token_id}), not a "
                             f"multiple of tokens_per_image={per}: expand each <image> to {per} tokens")
    if sum(counts) != n_images * per:
        raise ValueError(f"the batch has image tokens for {sum(counts) // per} images "
                         f"(per sample: {[c // per for c in counts]}) but pixel_values holds {n_images}")


def splice(x_btd: Tensor, ids_bt: Tensor, media_nkd: Tensor, image_token_id: int) -> Tensor:
    """Replace the embeddings at image-token positions by the media embeddings, in order."""
    B, T, D = x_btd.shape
    pos = (ids_bt.reshape(-1) == image_token_id).nonzero()[:, 0]
    return x_btd.reshape(B * T, D).index_copy(0, pos, media_nkd.reshape(-1, D).to(x_btd.dtype)).view(B, T, D)


def _pad_to(t: Tensor | None, T: int, value) -> Tensor | None:
    return None if t is None else F.pad(t, (0, T - t.shape[1]), value=value)


def normalize_batch(cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> dict:
    """Fill defaults (positions, masks) and, under SP, pad T to a multiple of tp with ignored tokens."""
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T]; got shape {tuple(ids.shape)}")
    B, T = ids.shape
    am, seg = batch.get("attention_mask"), batch.get("segment_ids")
    pos = batch.get("position_ids")
    if pos is None:
        pos = (am.long().cumsum(-1) - 1).clamp_min(0) if am is not None else torch.arange(T, device=ids.device).expand(B, T)
    out = dict(batch, position_ids=pos, seq_len=T)
    out["needs_mask"] = am is not None or seg is not None or (
        cfg.llm.sliding_window is not None and cfg.llm.sliding_window < T)
    Tp = -(-T // dist.tp_size) * dist.tp_size if dist.sp else T
    if Tp != T:
        am = torch.ones_like(ids) if am is None else am
        out.update(input_ids=_pad_to(ids, Tp, 0), attention_mask=_pad_to(am, Tp, 0),
                   position_ids=_pad_to(pos, Tp, 0), labels=_pad_to(batch.get("labels"), Tp, IGNORE),
                   segment_ids=_pad_to(seg, Tp, 0))
    return out


def context(cfg: ModelConfig, nb: dict, dist: Dist = LOCAL, dtype: torch.dtype = torch.float32,
            cache: dict | None = None, cache_pos: int = 0) -> llm.Context:
    """Rotary tables, attention mask and MoE token mask for a normalized batch."""
    lc = cfg.llm
    ids = nb["input_ids"]
    B, T = ids.shape
    rope = cos_sin(nb["position_ids"], inv_freq(lc.rot_dim, lc.rope_theta, lc.rope_scaling), dtype)
    am, seg = nb.get("attention_mask"), nb.get("segment_ids")
    mask = None
    if nb["needs_mask"]:
        idx = torch.arange(T, device=ids.device).expand(B, T)
        mask = make_mask(idx, idx, causal=True, window=lc.sliding_window, q_seg=seg, k_seg=seg,
                         k_valid=None if am is None else am.bool())
    valid = None if am is None else am.bool()
    if valid is not None and dist.sp:
        valid = valid.narrow(1, dist.tp_rank * (T // dist.tp_size), T // dist.tp_size)
    return llm.Context(rope=rope, mask=mask, valid=valid, cache=cache, cache_pos=cache_pos)


def embed_inputs(params: dict, cfg: ModelConfig, nb: dict, dist: Dist = LOCAL) -> Tensor:
    """Token embeddings with media spliced in; [B, T/tp, D] under SP, else [B, T, D]."""
    ids = nb["input_ids"]
    x = embed(params["llm"]["embed"], ids, dist)
    pix = nb.get("pixel_values")
    n_img = 0 if pix is None else pix.shape[0]
    check_media(ids, n_img, cfg)
    if n_img:
        x = splice(x, ids, encode_images(params, cfg, pix, dist), cfg.image_token_id)
    return comm.scatter_seq(x, dist) if dist.sp else x


def hidden(params: dict, cfg: ModelConfig, nb: dict, dist: Dist = LOCAL, **layer_kw) -> tuple[Tensor, Tensor, Tensor]:
    """Final-norm hidden states [B, T(/tp), D] and the summed MoE aux and z losses."""
    x = embed_inputs(params, cfg, nb, dist)
    ctx = context(cfg, nb, dist, x.dtype)
    x, aux, z = llm.layers(params["llm"], x, ctx, cfg.llm, dist, range(cfg.llm.n_layers),
                           moe_dispatch=cfg.moe_dispatch, **layer_kw)
    return llm.norm(params["llm"]["norm"], x, cfg.llm), aux, z


def forward(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> dict:
    """-> {"logits": [B, T, V] (this rank's vocab slice under TP), "aux", "z"}."""
    nb = normalize_batch(cfg, batch, dist)
    h, aux, z = hidden(params, cfg, nb, dist)
    h = comm.enter_tp(h, dist)
    logits = F.linear(h, llm.lm_head_weight(params["llm"]))[:, :nb["seq_len"]]
    return {"logits": logits, "aux": aux, "z": z}


def head_loss(p_llm: dict, h_btd: Tensor, nb: dict, dist: Dist) -> tuple[Tensor, Tensor]:
    """(sum of CE over label tokens, their count). Logits exist only at label positions."""
    h = comm.enter_tp(h_btd, dist)
    tgt = shift_labels(nb["labels"], nb.get("segment_ids"))
    sel = tgt != IGNORE
    logits = F.linear(h[sel], llm.lm_head_weight(p_llm))
    return cross_entropy_sum(logits, tgt[sel], dist), sel.sum()


def n_moe_layers(cfg: ModelConfig) -> int:
    return cfg.llm.n_layers if cfg.llm.n_experts else 0


def loss_terms(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL, **layer_kw) -> dict:
    """{"ce_sum", "n_tokens", "aux", "z"}: aux and z are summed over MoE layers (this rank's share
    under SP). Training normalises ce_sum by the label count of the whole step."""
    if batch.get("labels") is None:
        raise ValueError("batch has no 'labels': the loss needs them (-100 marks untrained tokens)")
    nb = normalize_batch(cfg, batch, dist)
    h, aux, z = hidden(params, cfg, nb, dist, **layer_kw)
    ce_sum, n = head_loss(params["llm"], h, nb, dist)
    return {"ce_sum": ce_sum, "n_tokens": n, "aux": aux, "z": z}


def combine(terms: dict, cfg: ModelConfig, n_tokens: Tensor | int | None = None, n_micro: int = 1) -> Tensor:
    """Scalar loss of one micro-batch's ``terms`` within a step: CE summed over the label tokens and
    divided by ``n_tokens``, the step's label count over all micro-batches and data-parallel ranks
    (default: this batch's), plus the MoE losses averaged over layers and over the ``n_micro``
    micro-batches of the step (all ranks included). Summing ``combine`` over the micro-batches of a
    step (and gradients over ranks) gives the loss of the whole step."""
    n = terms["n_tokens"] if n_tokens is None else n_tokens
    loss = terms["ce_sum"] / torch.as_tensor(n).clamp_min(1)
    if cfg.llm.n_experts:
        L = n_moe_layers(cfg) * n_micro
        loss = loss + (cfg.llm.aux_loss_coef * terms["aux"] + cfg.llm.z_loss_coef * terms["z"]) / L
    return loss


def loss(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> Tensor:
    """Mean next-token CE over label tokens (+ MoE auxiliary losses): a scalar for ``torch.func.grad``."""
    return combine(loss_terms(params, cfg, batch, dist), cfg)
