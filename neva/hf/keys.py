"""Our param paths <-> Hugging Face tensor names, for every key layout we read or write.

One ``Rule`` per leaf of our tree says where it lives in a checkpoint: one tensor (copied), one tensor
per expert (stacked on a new dim 0: Mixtral's ``block_sparse_moe.experts.N.w1``), or a row range of a
fused tensor (transformers 5.x's in-memory ``mlp.experts.gate_up_proj`` [E, 2F, D], which
``save_pretrained(save_original_format=False)`` writes). Reading a rule takes an optional index in
*our* layout (contiguous slices per dim) and reads only those bytes, for sharded loading.

Layouts (prefixes before the module names, which are the same everywhere):
  LLaVA hub / transformers 5.x   language_model.model.*, language_model.lm_head.weight,
                                 vision_tower.vision_model.* (or vision_tower.*), multi_modal_projector.*
  LLaVA transformers 4.52-4.57   model.language_model.*, lm_head.weight, model.vision_tower[.vision_model].*,
                                 model.multi_modal_projector.*
  XForCausalLM                   model.*, lm_head.weight
  CLIP/SigLIP vision or full     vision_model.* (older and full models) or * (5.x vision models)
  Dinov2[WithRegisters]Model     * (or dinov2.* / dinov2_with_registers.* inside a classifier)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from neva.hf.io import Checkpoint, Index


@dataclass(frozen=True)
class Layout:
    """Where each part's tensors live. ``moe``: how experts are stored ("block_sparse_moe" or "mlp" for
    per-expert keys, "fused" for gate_up_proj / down_proj). None: the part is not in this checkpoint."""

    llm: str | None = None
    lm_head: str | None = None
    vision: str | None = None
    projector: str | None = None
    moe: str = "block_sparse_moe"
    vision_names: str = "vit"        # how the vision tower's modules are named: vit (CLIP, SigLIP) | dino


HUB = Layout(llm="language_model.model.", lm_head="language_model.lm_head.weight",
             vision="vision_tower.vision_model.", projector="multi_modal_projector.")
_ANCHORS = {"llm": "embed_tokens.weight", "vision": "embeddings.patch_embedding.weight", "projector": "linear_1.weight"}


def _find(keys: set[str], part: str, candidates: list[str], folder: str) -> str:
    for c in candidates:
        if c + _ANCHORS[part] in keys:
            return c
    sample = sorted(keys)[:6]
    raise ValueError(f"{folder}: cannot find the {part} weights: expected one of "
                     f"{[c + _ANCHORS[part] for c in candidates]}; the checkpoint has e.g. {sample}")


def _moe_form(keys: set[str], llm: str) -> str:
    for form, probe in (("block_sparse_moe", "block_sparse_moe.experts.0.w1.weight"),
                        ("mlp", "mlp.experts.0.w1.weight"), ("fused", "mlp.experts.gate_up_proj")):
        if f"{llm}layers.0.{probe}" in keys:
            return form
    return "block_sparse_moe"            # the missing-key error will name the expected per-expert keys


def detect_llava(keys: set[str], folder: str) -> Layout:
    llm = _find(keys, "llm", ["language_model.model.", "model.language_model."], folder)
    head = next((k for k in ("language_model.lm_head.weight", "lm_head.weight") if k in keys), "")
    head = head or ("lm_head.weight" if llm.startswith("model.") else "language_model.lm_head.weight")
    vis = _find(keys, "vision", ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                                 "model.vision_tower."], folder)
    proj = _find(keys, "projector", ["multi_modal_projector.", "model.multi_modal_projector."], folder)
    return Layout(llm=llm, lm_head=head, vision=vis, projector=proj, moe=_moe_form(keys, llm))


def detect_llm(keys: set[str], folder: str) -> Layout:
    llm = _find(keys, "llm", ["model.", ""], folder)
    return Layout(llm=llm, lm_head="lm_head.weight", moe=_moe_form(keys, llm))


def detect_vision(keys: set[str], folder: str, kind: str = "clip") -> Layout:
    if kind == "dino":
        for c in ("", "dinov2.", "dinov2_with_registers."):
            if c + _DINO_ANCHOR in keys:
                return Layout(vision=c, vision_names="dino")
        raise ValueError(f"{folder}: cannot find the DINOv2 weights: expected {_DINO_ANCHOR} (or under dinov2.); "
                         f"the checkpoint has e.g. {sorted(keys)[:6]}")
    return Layout(vision=_find(keys, "vision", ["vision_model.", ""], folder))


# ------------------------------------------------------------------------------------ names
_LLM = {"embed": "embed_tokens", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
        "attn": "self_attn", "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w": "weight",
        "b": "bias", "norm": "norm", "layers": "layers", "mlp": "mlp",
        "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "fc1": "up_proj", "fc2": "down_proj"}
_VISION = {"patch": "embeddings.patch_embedding", "cls": "embeddings.class_embedding",
           "pos": "embeddings.position_embedding.weight", "pre_norm": "pre_layrnorm", "post_norm": "post_layernorm",
           "layers": "encoder.layers", "norm1": "layer_norm1", "norm2": "layer_norm2", "attn": "self_attn",
           "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "out_proj", "mlp": "mlp", "fc1": "fc1",
           "fc2": "fc2", "w": "weight", "b": "bias"}
_DINO = {"patch": "embeddings.patch_embeddings.projection", "cls": "embeddings.cls_token",
         "registers": "embeddings.register_tokens", "pos": "embeddings.position_embeddings", "layers": "encoder.layer",
         "norm1": "norm1", "norm2": "norm2", "attn": "attention", "wq": "attention.query", "wk": "attention.key",
         "wv": "attention.value", "wo": "output.dense", "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1",
         "mlp": "mlp", "fc1": "fc1", "fc2": "fc2", "post_norm": "layernorm", "w": "weight", "b": "bias"}
_DINO_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_VISION_NAMES = {"vit": _VISION, "dino": _DINO}
_PROJ = {"fc1": "linear_1", "fc2": "linear_2", "w": "weight", "b": "bias"}
_MOE = re.compile(r"^layers/(\d+)/mlp/(router|w1|w2|w3)$")


def _name(rel: str, table: dict) -> str:
    return ".".join(p if p.isdigit() else table[p] for p in rel.split("/"))


@dataclass(frozen=True)
class Rule:
    """keys: one HF tensor, or one per expert (stacked on dim 0). rows: (start, stop) of dim 1 of a fused
    tensor. hf_shape: the shape each key should have, from our spec (for error messages)."""

    path: str
    keys: tuple[str, ...]
    hf_shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    stacked: bool = False


def rule(path: str, shape: tuple[int, ...], lay: Layout) -> Rule:
    """The rule for our leaf ``path`` (e.g. llm/layers/0/attn/wq/w) of full ``shape``."""
    part, rel = path.split("/", 1)
    if part == "vision":
        return Rule(path, (lay.vision + _name(rel, _VISION_NAMES[lay.vision_names]),), shape)
    if part == "projector":
        return Rule(path, (lay.projector + _name(rel, _PROJ),), shape)
    if rel == "lm_head/w":
        return Rule(path, (lay.lm_head,), shape)
    m = _MOE.match(rel)
    if not m:
        return Rule(path, (lay.llm + _name(rel, _LLM),), shape)
    i, leaf = m.groups()
    base = f"{lay.llm}layers.{i}.{'mlp' if lay.moe in ('mlp', 'fused') else 'block_sparse_moe'}"
    if leaf == "router":
        return Rule(path, (f"{base}.gate.weight",), shape)
    E, F = shape[0], (shape[1] if leaf != "w2" else shape[2])
    if lay.moe == "fused":
        if leaf == "w2":
            return Rule(path, (f"{base}.experts.down_proj",), shape)
        start = 0 if leaf == "w1" else F
        return Rule(path, (f"{base}.experts.gate_up_proj",), (E, 2 * F, shape[2]), rows=(start, start + F))
    return Rule(path, tuple(f"{base}.experts.{e}.{leaf}.weight" for e in range(E)), shape[1:], stacked=True)


def found_shape(ck: Checkpoint, r: Rule) -> list[str]:
    """Problems with the shapes of ``r``'s tensors in ``ck`` (empty if they fit)."""
    bad = []
    for k in r.keys:
        s = ck.shape(k)
        if s != tuple(r.hf_shape):
            bad.append(f"{k}: found {s}, expected {tuple(r.hf_shape)} ({r.path})")
    return bad


def read(ck: Checkpoint, r: Rule, index: Index | None = None) -> Tensor:
    """Our leaf (or its ``index`` slice, in our layout) from the checkpoint."""
    idx = tuple(index or ())
    if r.stacked:
        e = idx[0] if idx else slice(None)
        experts = range(len(r.keys))[e]
        return torch.stack([ck.read(r.keys[j], idx[1:]) for j in experts])
    if r.rows is not None:
        idx = idx + (slice(None),) * (2 - len(idx)) if len(idx) < 2 else idx
        a, b, _ = idx[1].indices(r.rows[1] - r.rows[0])
        return ck.read(r.keys[0], (idx[0], slice(r.rows[0] + a, r.rows[0] + b)) + idx[2:])
    return ck.read(r.keys[0], idx)


def write(path: str, t: Tensor, lay: Layout) -> list[tuple[str, Tensor]]:
    """Our leaf -> its HF tensors in ``lay`` (per-expert keys for stacked experts)."""
    r = rule(path, tuple(t.shape), lay)
    if r.stacked:
        return [(k, t[e]) for e, k in enumerate(r.keys)]
    if r.rows is not None:
        raise ValueError("writing the fused expert layout is not supported; write per-expert keys")
    return [(r.keys[0], t)]


# Tensors a checkpoint may hold that our model does not use: rotary caches of old checkpoints, CLIP's
# position_ids buffer, SigLIP's pooling head (LLaVA reads hidden states, never the pooled output),
# DINOv2's mask token (used only by its masked-image pretraining).
IGNORED = [re.compile(p) for p in (r"\.rotary_emb\.inv_freq$", r"embeddings\.position_ids$", r"embeddings\.mask_token$")]


def ignored(key: str, lay: Layout, vision_only: bool = False) -> bool:
    if any(p.search(key) for p in IGNORED):
        return True
    if lay.vision is not None and key.startswith(lay.vision + "head."):
        return True
    # a full CLIPModel / SiglipModel: everything outside the vision tower (text tower, projections, scales)
    return vision_only and not key.startswith(lay.vision)
