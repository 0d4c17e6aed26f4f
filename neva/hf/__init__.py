"""Hugging Face checkpoints in and out: ``load`` a LLaVA folder, ``load_parts`` a NeVA from separate
vision and language folders, ``save`` a LLaVA folder that transformers (and vLLM/SGLang) load.

    cfg, params = neva.hf.load("llava-1.5-7b-hf")
    cfg, params = neva.hf.load_parts("siglip-so400m-patch14-384", "Mixtral-8x7B-v0.1", projector="mlp2x_gelu")
    neva.hf.save(params, cfg, "out/llava", data=exp.data)   # + tokenizer, chat template, processor

Everything is safetensors, read lazily one tensor at a time (``neva/hf/io.py``). Sharded loading:
``load(..., shard=fn)`` calls ``fn(path, full_shape)`` for every leaf (our path and layout, e.g.
``llm/layers/3/mlp/w1`` with shape [E, F, D]) and reads only the returned tuple of contiguous slices
(``None`` = the whole tensor), so each rank of a parallel plan reads only its bytes; stacked experts
read only the experts in the slice. Shapes are checked in full against the config before anything is
read, and a missing, unexpected or misshapen tensor is an error naming the key, found and expected.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import torch

from neva import llm
from neva.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from neva.hf import keys as K
from neva.hf import translate
from neva.hf.io import DTYPE_NAMES, Checkpoint, Index, check_index, read_json, write
from neva.model import specs as model_specs
from neva.params import flatten, init, unflatten
from neva.registry import ENCODERS

Shard = Callable[[str, tuple[int, ...]], "Index | None"]
MAX_SHARD_BYTES = 5 * 1024**3

__all__ = ["load", "load_parts", "load_vision", "load_llm", "save", "Shard"]


def _config(folder: str) -> dict:
    return read_json(os.path.join(folder, "config.json"))


def _read(ck: Checkpoint, lay: K.Layout, specs: dict, *, dtype: torch.dtype | None, shard: Shard | None,
          vision_only: bool = False, tied_embed: str | None = None) -> dict:
    """Read every leaf of ``specs`` (a flat {path: ParamSpec}) from ``ck``; the checkpoint must hold
    exactly these tensors (plus ``K.ignored`` ones)."""
    rules = {p: K.rule(p, tuple(s.shape), lay) for p, s in specs.items()}
    wanted = {k for r in rules.values() for k in r.keys}
    have = ck.keys
    missing = [f"{k} ({r.path})" for r in rules.values() for k in r.keys if k not in have]
    extra = sorted(k for k in have - wanted if not K.ignored(k, lay, vision_only) and k != tied_embed)
    bad = [b for r in rules.values() if all(k in have for k in r.keys) for b in K.found_shape(ck, r)]
    msgs = []
    for what, xs in (("missing", missing), ("unexpected", extra), ("wrong shape", bad)):
        if xs:
            msgs.append(f"{len(xs)} {what}: " + "; ".join(xs[:6]) + (" ..." if len(xs) > 6 else ""))
    if msgs:
        raise ValueError(f"{ck.folder}: the checkpoint does not match its config.json: "
                         + " | ".join(msgs))
    out = {}
    for p, r in rules.items():
        idx = None if shard is None else shard(p, tuple(specs[p].shape))
        if idx is not None:
            check_index(tuple(idx), tuple(specs[p].shape), p)
            sizes = [len(range(*s.indices(n))) for s, n in zip(idx, specs[p].shape)]
            if 0 in sizes:                              # a leaf this rank does not hold: read nothing
                out[p] = torch.empty(sizes + list(specs[p].shape[len(sizes):]), dtype=dtype or torch.float32)
                continue
        t = K.read(ck, r, idx)
        out[p] = t if dtype is None else t.to(dtype)
    return out


def _check_tied_head(ck: Checkpoint, lay: K.Layout, embed_key: str) -> str | None:
    """A tied model may still store lm_head (some exporters do): allowed only if it equals the embedding."""
    if lay.lm_head not in ck.keys:
        return None
    if not torch.equal(ck.read(lay.lm_head), ck.read(embed_key)):
        raise ValueError(f"{ck.folder}: config ties the embeddings (tie_word_embeddings=true) but {lay.lm_head} "
                         f"differs from {embed_key}; set tie_word_embeddings=false to keep both")
    return lay.lm_head


def load(folder: str, *, dtype: torch.dtype | None = None, shard: Shard | None = None) -> tuple[ModelConfig, dict]:
    """A LlavaForConditionalGeneration folder -> (ModelConfig, params).

    dtype: cast every leaf (None keeps the stored dtype). shard: see the module docstring."""
    cfg = translate.llava_config(_config(folder), os.path.join(folder, "config.json"))
    spec = flatten(model_specs(cfg))
    with Checkpoint(folder) as ck:
        lay = K.detect_llava(ck.keys, folder)
        tied = _check_tied_head(ck, lay, lay.llm + "embed_tokens.weight") if cfg.llm.tie_embeddings else None
        return cfg, unflatten(_read(ck, lay, spec, dtype=dtype, shard=shard, tied_embed=tied))


def _vision_dict(folder: str) -> dict:
    d = _config(folder)
    where = os.path.join(folder, "config.json")
    if d.get("model_type") in ("clip", "siglip"):                 # a full CLIPModel / SiglipModel
        vd = dict(d.get("vision_config") or {})
        vd.setdefault("model_type", d["model_type"] + "_vision_model")
        return vd
    if d.get("model_type") not in translate.VISION_TYPES:
        raise ValueError(f"{where}: model_type={d.get('model_type')!r}, architectures={d.get('architectures')}: "
                         f"expected a CLIPVisionModel / SiglipVisionModel (or CLIPModel / SiglipModel) or "
                         f"Dinov2Model / Dinov2WithRegistersModel folder")
    return d


def load_vision(folder: str, *, select_layer: int = -2, select_feature: str = "patch",
                dtype: torch.dtype | None = None, shard: Shard | None = None) -> tuple[VisionConfig, dict]:
    """A CLIPVisionModel / SiglipVisionModel folder (or a full CLIPModel / SiglipModel, of which the
    vision tower is taken), or a Dinov2Model / Dinov2WithRegistersModel folder -> (VisionConfig, params
    of that encoder). A DINOv2 starts at its trained image size; ``dataclasses.replace(cfg,
    image_size=224)`` runs it at another (the position table is resampled, as HF does)."""
    vc = translate.vision_config(_vision_dict(folder), os.path.join(folder, "config.json"), select_layer,
                                 select_feature)
    spec = {f"vision/{p}": s for p, s in flatten(ENCODERS[vc.kind].specs(vc)).items()}
    with Checkpoint(folder) as ck:
        lay = K.detect_vision(ck.keys, folder, vc.kind)
        flat = _read(ck, lay, spec, dtype=dtype, shard=shard, vision_only=True)
    return dataclasses.replace(vc, from_pretrained=folder), unflatten(flat)["vision"]


def load_llm(folder: str, *, dtype: torch.dtype | None = None, shard: Shard | None = None) -> tuple[LLMConfig, dict]:
    """A Llama / Mistral / Mixtral / Nemotron ForCausalLM folder -> (LLMConfig, params of ``neva.llm``)."""
    where = os.path.join(folder, "config.json")
    d = _config(folder)
    arch = d.get("architectures") or []
    if d.get("model_type") not in translate.LLM_TYPES or (arch and not any(a.endswith("ForCausalLM") for a in arch)):
        raise ValueError(f"{where}: model_type={d.get('model_type')!r}, architectures={arch}: expected a "
                         f"LlamaForCausalLM / MistralForCausalLM / MixtralForCausalLM / NemotronForCausalLM folder")
    lc = translate.llm_config(d, where)
    spec = {f"llm/{p}": s for p, s in flatten(llm.specs(lc)).items()}
    with Checkpoint(folder) as ck:
        lay = K.detect_llm(ck.keys, folder)
        tied = _check_tied_head(ck, lay, lay.llm + "embed_tokens.weight") if lc.tie_embeddings else None
        flat = _read(ck, lay, spec, dtype=dtype, shard=shard, tied_embed=tied)
    return dataclasses.replace(lc, from_pretrained=folder), unflatten(flat)["llm"]


def load_parts(vision_folder: str, llm_folder: str, projector: str = "mlp2x_gelu", seed: int = 0,
               image_token_id: int | None = None, *, select_layer: int = -2, select_feature: str = "patch",
               projector_bias: bool = True, dtype: torch.dtype | None = None,
               shard: Shard | None = None) -> tuple[ModelConfig, dict]:
    """A NeVA from a CLIP / SigLIP vision folder and a Llama / Mistral / Mixtral / Nemotron causal-LM
    folder, with a freshly initialised projector (``params.init`` of its specs with ``seed``, so it
    equals the projector of ``neva.init_params(cfg, seed)``): the start of projector pretraining.

    image_token_id: the placeholder id your tokenizer gives ``<image>``; None takes the last id of the
    vocabulary (``vocab_size - 1``), which is only a marker (its embedding is replaced by the image
    features) but must never occur in text: pass your tokenizer's id when you have one."""
    vc, vparams = load_vision(vision_folder, select_layer=select_layer, select_feature=select_feature,
                              dtype=dtype, shard=shard)
    lc, lparams = load_llm(llm_folder, dtype=dtype, shard=shard)
    cfg = ModelConfig(vision=vc, projector=ProjectorConfig(projector, bias=projector_bias), llm=lc,
                      image_token_id=lc.vocab_size - 1 if image_token_id is None else image_token_id)
    pspec = model_specs(cfg)["projector"]
    proj = flatten(init(pspec, seed, dtype or lparams["embed"]["w"].dtype, prefix="projector"))
    if shard is not None:
        proj = {p: v[tuple(shard(f"projector/{p}", tuple(v.shape)) or ())] for p, v in proj.items()}
    return cfg, {"vision": vparams, "projector": unflatten(proj), "llm": lparams}


def save(params: dict, cfg: ModelConfig, folder: str, *, data=None, tokenizer=None,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write a LlavaForConditionalGeneration folder (config.json + safetensors, sharded above
    ``max_shard_bytes`` with model.safetensors.index.json) in the hub key layout (``language_model.model.*``,
    ``language_model.lm_head``, ``multi_modal_projector.*`` and ``vision_tower.vision_model.*``: 5.x itself
    writes ``vision_tower.*`` but reads both, while 4.x and vLLM need ``vision_model``). Only the
    mlp2x_gelu projector exists in HF LLaVA. Returns the files written.

    data: the run's ``DataConfig`` (template, tokenizer, system prompt, image mode, frames per video):
    with it the folder is complete and serves as trained (``neva/hf/folder.py``: tokenizer with
    ``<image>``, chat template, image processor, processor and generation configs; ``AutoProcessor``,
    vLLM and SGLang load it). tokenizer: the tokenizer object training used (default: loaded from
    ``data.tokenizer``). Without ``data`` only the weights and config.json are written."""
    cfg.validate()
    if data is not None:                        # refuse an unservable image mode before writing anything
        from neva.hf import folder as serving
        serving.image_processor(cfg, data.image_mode)
    spec, flat = flatten(model_specs(cfg)), flatten(params)
    conf = translate.llava_json(cfg, DTYPE_NAMES.get(flat.get("llm/embed/w", torch.empty(0)).dtype, "float32"))
    missing, extra = [p for p in spec if p not in flat], [p for p in flat if p not in spec]
    bad = [f"{p}: found {tuple(flat[p].shape)}, expected {tuple(spec[p].shape)}"
           for p in spec if p in flat and tuple(flat[p].shape) != tuple(spec[p].shape)]
    if missing or extra or bad:
        raise ValueError(f"save: params do not match the config (local shards? gather them first; LoRA leaves? "
                         f"neva.train.lora.merge them first): missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"wrong shape {bad[:5]}")
    tensors = [kt for p in spec for kt in K.write(p, flat[p], K.HUB)]
    os.makedirs(folder, exist_ok=True)
    files = write(tensors, folder, max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    if data is None:
        return files + ["config.json"]
    if tokenizer is None:
        from neva.data import tokenizers
        tokenizer = tokenizers.load(data.tokenizer)
    return serving.write(folder, cfg, tokenizer, data)
