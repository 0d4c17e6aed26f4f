"""The NeVA composition: encode images, project, splice into the token embeddings, decode, loss.

``batch`` (all tensors; only ``input_ids`` is required):
  input_ids      int[B, T]   images already expanded: each image is ``tokens_per_image`` consecutive
                             ``image_token_id``s (as HF's LlavaProcessor does); a video is its frames
  pixel_values   float[N, 3, H, W]  the images (and video frames) in order of appearance, row-major
                             over the batch; absent or N = 0 for text-only batches. An encoder with
                             towers (kind=fused) takes {tower kind: float[N, 3, H_t, W_t]} instead
  labels         int[B, T]   aligned with input_ids (HF convention), -100 = not trained
  attention_mask int[B, T]   1 = token, 0 = padding (left or right)
  position_ids   int[B, T]   default: 0.. per row (from attention_mask when given)
  segment_ids    int[B, T]   packed samples: attention never crosses a change of id

Every function takes a ``Dist`` (default: one process); under a plan the params are local shards
and the collectives in the layers do the rest. The parts are looked up by name in ``neva.registry``;
the LLM trunk is ``neva/llm.py``'s, which pipeline stages and generation run too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import comm, dino, fused, llm, projector, vision  # noqa: F401 - importing the parts registers them
from neva.batch import IGNORE, Media, media_count, media_map
from neva.comm import LOCAL, Dist
from neva.config import ModelConfig
from neva.loss import LossTerms, cross_entropy_sum, shift_labels
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
    """float[N, 3, H, W] (per tower for kind=fused) -> media embeddings [N, tokens_per_image, D_llm]."""
    dtype = params["llm"]["embed"]["w"].dtype
    pix = media_map(lambda t: t.to(dtype), pixel_values)
    feats = ENCODERS[cfg.vision.kind].apply(params["vision"], pix, cfg.vision, dist.part("vision"))
    return PROJECTORS[cfg.projector.kind].apply(params["projector"], feats, cfg, dist.part("projector"))


def per_example(t: Tensor) -> bool:
    """True inside ``torch.func.vmap`` (per-example gradients): values are not concrete there, so the
    checks that read them are skipped and no step may pick rows by value (shapes must not depend on data)."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):       # grad wraps too: look through every level for a vmap one
        if ft.is_batchedtensor(t):
            return True
        t = ft.get_unwrapped(t)
    return False


def check_media(ids_bt: Tensor, n_images: int, cfg: ModelConfig) -> None:
    """Raise unless the image tokens of each sample come in whole images and match pixel_values."""
    if per_example(ids_bt):
        return
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
    is_img = ids_bt.reshape(-1) == image_token_id
    media = media_nkd.reshape(-1, D).to(x_btd.dtype)
    if per_example(ids_bt):    # no nonzero under vmap: image token j takes media row (images before it)
        rows = media[(is_img.long().cumsum(0) - 1).clamp(0, max(media.shape[0] - 1, 0))]
        return torch.where(is_img[:, None], rows, x_btd.reshape(B * T, D)).view(B, T, D)
    return x_btd.reshape(B * T, D).index_copy(0, is_img.nonzero()[:, 0], media).view(B, T, D)


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
    d = dist.part("llm")
    Tp = -(-T // d.tp_size) * d.tp_size if d.sp else T
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
    if valid is not None and d.sp:                    # MoE statistics count this rank's tokens
        T = valid.shape[1]
        valid = valid.narrow(1, d.tp_rank * (T // d.tp_size), T // d.tp_size)
    return llm.context(cfg.llm, nb["position_ids"], dtype, mask=nb["needs_mask"], segments_bt=nb.get("segment_ids"),
                       k_valid_bs=None if am is None else am.bool(), valid_bt=valid)


def embed_inputs(params: dict, cfg: ModelConfig, nb: dict, dist: Dist = LOCAL) -> Tensor:
    """Token embeddings with media spliced in; [B, T/tp, D] under SP, else [B, T, D]."""
    ids, d = nb["input_ids"], dist.part("llm")
    x = llm.embed(params["llm"], ids, d)
    pix = nb.get("pixel_values")
    n_img = media_count(pix)
    check_media(ids, n_img, cfg)
    if n_img:
        x = splice(x, ids, encode_images(params, cfg, pix, dist), cfg.image_token_id)
    return comm.scatter_seq(x, d) if d.sp else x


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
    if loss:
        tgt = shift_labels(nb["labels"], nb.get("segment_ids"))
        sel = tgt != IGNORE
        if per_example(tgt):   # the head on every row; the CE skips IGNORE targets
            ce, n = cross_entropy_sum(llm.head(params["llm"], x, cfg.llm, d).flatten(0, 1), tgt.flatten(), d), sel.sum()
        else:                  # the head only where a label is: most rows of a VLM batch are prompt and image
            ce, n = cross_entropy_sum(llm.head(params["llm"], x, cfg.llm, d, rows_bt=sel), tgt[sel], d), sel.sum()
    return x, LossTerms(ce, n, aux, z)


def forward(params: dict, cfg: ModelConfig, batch: dict, dist: Dist = LOCAL) -> dict:
    """-> {"logits": [B, T, V] (this rank's vocab slice under TP), "aux", "z"}."""
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
