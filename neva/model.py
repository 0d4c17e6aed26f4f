"""The NeVA composition: encode images, project, splice into the token embeddings, decode, loss.

``batch`` (all tensors; only ``input_ids`` is required):
  input_ids      int[B, T]   images already expanded: each image is ``tokens_per_image`` consecutive
                             ``image_token_id``s (as HF's LlavaProcessor does); a video is its frames
  pixel_values   float[N, 3, H, W]  the images (and video frames) in order of appearance, row-major
                             over the batch; absent or N = 0 for text-only batches. An encoder with
                             towers (kind=fused) takes {tower kind: float[N, 3, H_t, W_t]} instead
  video_frames   bool[N]     True where a pixel_values row is a video frame: only read when the
                             projector pools frames (``projector.frame_pool`` > 1), when a frame is
                             ``tokens_per_frame`` image tokens and an image ``tokens_per_image``
  labels         int[B, T]   aligned with input_ids (HF convention), -100 = not trained
  attention_mask int[B, T]   1 = token, 0 = padding (left or right)
  position_ids   int[B, T]   default: 0.. per row (from attention_mask when given)
  segment_ids    int[B, T]   packed samples: attention never crosses a change of id

Every function takes a ``Dist`` (default: one process); under a plan the params are local shards
and the collectives in the layers do the rest. Media are spliced into the whole sequence first; only
then is it split, over cp (chunks i and 2cp-1-i) and under SP over tp, so a rank may hold part of an
image and nothing breaks. The parts are looked up by name in ``neva.registry``;
the LLM trunk is ``neva/llm.py``'s, which pipeline stages and generation run too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import comm, dino, fused, llm, projector, vision  # noqa: F401 - importing the parts registers them
from neva.batch import IGNORE, Media, media_count, media_map, media_per_row
from neva.comm import LOCAL, Dist
from neva.config import ModelConfig
from neva.loss import LossTerms, cross_entropy_sum, linear_cross_entropy_sum, shift_labels
from neva.params import init as init_tree
from neva.registry import ENCODERS, PROJECTORS


def specs(cfg: ModelConfig) -> dict:
    cfg.validate()
    return {"vision": ENCODERS[cfg.vision.kind].specs(cfg.vision), "projector": PROJECTORS[cfg.projector.kind].specs(cfg),
            "llm": llm.specs(cfg.llm)}


def init_params(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random params; each leaf depends only on (seed, its path)."""
    return init_tree(specs(cfg), seed, dtype)


def encode_images(params: dict, cfg: ModelConfig, pixel_values: Media, dist: Dist = LOCAL) -> Tensor:
    """float[N, 3, H, W] (per tower for kind=fused) -> media embeddings [N, tokens_per_image, D_llm]. A
    frame-parallel tower (``Dist.frame_parts``) encodes this rank's share of the rows (``comm.frame_share``;
    the rows padded with blank images to a multiple of cp x tp) and gathers the projected features."""
    dtype = params["llm"]["embed"]["w"].dtype
    x, n = media_map(lambda t: t.to(dtype), pixel_values), media_count(pixel_values)
    shared = "vision" in dist.frame_parts and (dist.cp is not None or dist.tp is not None)
    if shared:
        start, per = comm.frame_share(n, dist)
        pad = per * dist.cp_size * dist.tp_size - n
        x = media_map(lambda t: torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]).narrow(0, start, per), x)
    x = ENCODERS[cfg.vision.kind].apply(params["vision"], x, cfg.vision, dist.part("vision"))
    if shared and "projector" not in dist.frame_parts:
        x = comm.gather_frames(x, dist)[:n]
    x = PROJECTORS[cfg.projector.kind].apply(params["projector"], x, cfg, dist.part("projector"))
    return comm.gather_frames(x, dist)[:n] if shared and "projector" in dist.frame_parts else x


def per_example(t: Tensor) -> bool:
    """True inside ``torch.func.vmap`` (per-example gradients): values are not concrete there, so the
    checks that read them are skipped and no step may pick rows by value (shapes must not depend on data)."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):       # grad wraps too: look through every level for a vmap one
        if ft.is_batchedtensor(t):
            return True
        t = ft.get_unwrapped(t)
    return False


def media_tokens(params: dict, cfg: ModelConfig, pixel_values: Tensor, video_frames: Tensor | None = None,
                 dist: Dist = LOCAL) -> Tensor:
    """The media's embeddings as the sequence holds them, [M, D_llm] in order of appearance: each
    image ``tokens_per_image`` rows, each video frame (``video_frames``) pooled to ``tokens_per_frame``."""
    emb = encode_images(params, cfg, pixel_values, dist)
    D, stride = emb.shape[-1], cfg.projector.frame_pool
    if video_frames is None or stride == 1:
        return emb.reshape(-1, D)
    f = video_frames.bool()
    P, Pf = emb.shape[1], cfg.tokens_per_frame
    rows = torch.cat([emb[~f].reshape(-1, D), projector.pool_frames(emb[f], stride).reshape(-1, D)])
    # media i starts at its image's or its frame's block; then its tokens in order
    n_img = int((~f).sum())
    start = torch.where(f, n_img * P + (f.long().cumsum(0) - 1) * Pf, ((~f).long().cumsum(0) - 1) * P)
    size = torch.where(f, Pf, P)
    first = torch.repeat_interleave(size.cumsum(0) - size, size)
    idx = torch.repeat_interleave(start, size) + torch.arange(int(size.sum()), device=emb.device) - first
    return rows[idx]


def check_media(ids_bt: Tensor, n_images: int, cfg: ModelConfig, video_frames: Tensor | None = None) -> None:
    """Raise unless the image tokens of each sample come in whole media and match pixel_values."""
    if per_example(ids_bt):
        return
    if video_frames is not None and video_frames.shape[0] != n_images:
        raise ValueError(f"video_frames has {video_frames.shape[0]} entries but pixel_values holds {n_images} rows: "
                         "one flag per media row (True where the row is a video frame)")
    per_row = media_per_row({"input_ids": ids_bt, "video_frames": video_frames}, cfg)
    if sum(per_row) != n_images:
        raise ValueError(f"the batch has image tokens for {sum(per_row)} images "
                         f"(per sample: {per_row}) but pixel_values holds {n_images}")


def splice(x_btd: Tensor, ids_bt: Tensor, media_nkd: Tensor, image_token_id: int) -> Tensor:
    """Replace the embeddings at image-token positions by the media embeddings, in order."""
    B, T, D = x_btd.shape
    is_img = ids_bt.reshape(-1) == image_token_id
    media = media_nkd.reshape(-1, D).to(x_btd.dtype)
    if per_example(ids_bt):    # no nonzero under vmap: image token j takes media row (images before it)
        rows = media[(is_img.long().cumsum(0) - 1).clamp(0, max(media.shape[0] - 1, 0))]
        return torch.where(is_img[:, None], rows, x_btd.reshape(B * T, D)).view(B, T, D)
    return x_btd.reshape(B * T, D).index_copy(0, is_img.nonzero()[:, 0], media).view(B, T, D)


def _pad_to(t: Tensor | None, T: int, value) -> Tensor | None:
    return None if t is None else F.pad(t, (0, T - t.shape[1]), value=value)


def sequence_multiple(cp: int, tp: int, sp: bool) -> int:
    """What the LLM's sequence length must be a multiple of: 2 x cp chunks, each split over tp under SP."""
    return 2 * cp * (tp if sp else 1) if cp > 1 else (tp if sp else 1)


def seq_multiple(dist: Dist) -> int:
    d = dist.part("llm")
    return sequence_multiple(d.cp_size if d.cp is not None else 1, d.tp_size, d.sp)


def local_len(T: int, dist: Dist) -> int:
    """Tokens of a normalized sequence of ``T`` that one rank holds between the LLM's layers."""
    d = dist.part("llm")
    return T // d.cp_size // (d.tp_size if d.sp else 1)


def right_padded(am_bt: Tensor) -> bool:
    """True when every row of the attention mask is ones, then zeros (what the training collate makes).
    Causal attention then keeps every real token off the padding by itself, so no mask is built and
    SDPA skips the blocks above the diagonal: padding queries see real keys, but nothing reads their
    outputs (the loss and the MoE statistics skip them; the sequence pads from the right for SP the
    same way). Under vmap the values are not concrete: False, the mask then."""
    return not per_example(am_bt) and bool((am_bt[:, 1:] <= am_bt[:, :-1]).all())


def normalize_batch(cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> dict:
    """Fill defaults (positions, masks) and, under SP or CP, pad T to a multiple of ``seq_multiple``
    with ignored tokens."""
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T]; got shape {tuple(ids.shape)}")
    B, T = ids.shape
    am, seg = batch.get("attention_mask"), batch.get("segment_ids")
    pos = batch.get("position_ids")
    if pos is None:
        pos = (am.long().cumsum(-1) - 1).clamp_min(0) if am is not None else torch.arange(T, device=ids.device).expand(B, T)
    out = dict(batch, position_ids=pos, seq_len=T)
    d = dist.part("llm")
    out["needs_mask"] = (am is not None and not right_padded(am)) or seg is not None or d.cp is not None or (
        cfg.llm.sliding_window is not None and cfg.llm.sliding_window < T)             # cp: queries at an offset
    m = seq_multiple(d)
    Tp = -(-T // m) * m
    if Tp != T:
        am = torch.ones_like(ids) if am is None else am
        out.update(input_ids=_pad_to(ids, Tp, 0), attention_mask=_pad_to(am, Tp, 0),
                   position_ids=_pad_to(pos, Tp, 0), labels=_pad_to(batch.get("labels"), Tp, IGNORE),
                   segment_ids=_pad_to(seg, Tp, 0))
    return out


def context(cfg: ModelConfig, nb: dict, dist: Dist = LOCAL, dtype: torch.dtype = torch.float32) -> llm.Context:
    """The trunk's Context for a normalized batch: its positions, padding and packed segments."""
    am = nb.get("attention_mask")
    valid = None if am is None else am.bool()
    d = dist.part("llm")
    local = None if d.cp is None else comm.cp_slots(nb["position_ids"].shape[1], d, nb["position_ids"].device)
    if valid is not None and local is not None:       # MoE statistics count this rank's tokens
        valid = valid[:, local]
    if valid is not None and d.sp:
        T = valid.shape[1]
        valid = valid.narrow(1, d.tp_rank * (T // d.tp_size), T // d.tp_size)
    return llm.context(cfg.llm, nb["position_ids"], dtype, mask=nb["needs_mask"], segments_bt=nb.get("segment_ids"),
                       k_valid_bs=None if am is None else am.bool(), valid_bt=valid, local_t=local)


def embed_inputs(params: dict, cfg: ModelConfig, nb: dict, dist: Dist = LOCAL) -> Tensor:
    """Token embeddings with media spliced in, then this rank's part of the sequence:
    [B, local_len(T), D] (T / cp under CP, / tp under SP)."""
    ids, d = nb["input_ids"], dist.part("llm")
    x = llm.embed(params["llm"], ids, d)
    pix, frames = nb.get("pixel_values"), nb.get("video_frames")
    n_img = media_count(pix)
    check_media(ids, n_img, cfg, frames)
    if n_img:
        x = splice(x, ids, media_tokens(params, cfg, pix, frames, dist), cfg.image_token_id)
    x = comm.cp_local(x, d, 1)                    # after the splice: a rank may hold part of an image
    return comm.scatter_seq(x, d) if d.sp else x


def targets(nb: dict, dist: Dist = LOCAL) -> Tensor:
    """Next-token targets of a normalized batch at this rank's positions (its cp chunks): int[B, T_local]."""
    return comm.cp_local(shift_labels(nb["labels"], nb.get("segment_ids")), dist.part("llm"), 1)


def trunk(params: dict, cfg: ModelConfig, nb: dict, dist: Dist = LOCAL, *, x: Tensor | None = None,
          ids: range | None = None, loss: bool = True, layers: llm.Layers = llm.layers) -> tuple[Tensor, LossTerms]:
    """The model over a normalized batch, or a pipeline stage's part of it: embed the tokens and
    media unless ``x`` (a later stage's input) is given, run the LLM layers ``ids`` (default all) with
    ``layers`` (``llm.layers`` or a remat wrapper of it), then the CE over the label tokens if ``loss``
    (the last stage). -> (hidden states after the layers [B, T(/tp), D], this part's LossTerms)."""
    d = dist.part("llm")
    x = embed_inputs(params, cfg, nb, dist) if x is None else x
    ctx = context(cfg, nb, dist, x.dtype)
    x, aux, z = layers(params["llm"], x, ctx, cfg.llm, d, range(cfg.llm.n_layers) if ids is None else ids,
                       moe_dispatch=cfg.moe_dispatch)
    ce = n = torch.zeros((), device=x.device)
    if loss:                                      # shifted over the whole sequence, then this rank's part
        tgt = targets(nb, dist)
        sel = tgt != IGNORE
        if per_example(tgt):   # the head on every row; the CE skips IGNORE targets
            ce, n = cross_entropy_sum(llm.head(params["llm"], x, cfg.llm, d).flatten(0, 1), tgt.flatten(), d), sel.sum()
        else:                  # the head only where a label is: most rows of a VLM batch are prompt and image
            h = llm.head_input(params["llm"], x, cfg.llm, d, rows_bt=sel)
            ce, n = linear_cross_entropy_sum(h, llm.lm_head_weight(params["llm"]), tgt[sel], d), sel.sum()
    return x, LossTerms(ce, n, aux, z)


def forward(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> dict:
    """-> {"logits": [B, T, V] (this rank's vocab slice under TP), "aux", "z"}."""
    if dist.part("llm").cp is not None:
        raise NotImplementedError("forward returns the whole sequence's logits; under context parallelism a rank "
                                  "holds only its chunks: train with loss / loss_terms, generate with cp=1")
    nb = normalize_batch(cfg, batch, dist)
    x, t = trunk(params, cfg, nb, dist, loss=False)
    logits = llm.head(params["llm"], x, cfg.llm, dist.part("llm"))[:, :nb["seq_len"]]
    return {"logits": logits, "aux": t.aux, "z": t.z}


def loss_terms(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL,
               layers: llm.Layers = llm.layers) -> LossTerms:
    """The batch's LossTerms (sums; ``neva.loss``): what a training step weighs by the label count
    and micro-batch count of the whole step."""
    if batch.get("labels") is None:
        raise ValueError("batch has no 'labels': the loss needs them (-100 marks untrained tokens)")
    return trunk(params, cfg, normalize_batch(cfg, batch, dist), dist, layers=layers)[1]


def loss(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> Tensor:
    """Mean next-token CE over label tokens (+ MoE auxiliary losses): a scalar for ``torch.func.grad``."""
    return loss_terms(params, cfg, batch, dist).total(cfg.llm)
