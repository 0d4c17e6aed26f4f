"""What an exported LLaVA folder holds beside its weights so that it serves as trained: the tokenizer
with ``<image>`` at ``image_token_index``, the chat template of the training template
(``neva/hf/chat.py``), the image processor that reproduces our preprocessing, ``LlavaProcessor``'s
config, ``generation_config.json`` (eos, pad) and, in ``config.json``, a ``neva`` record of the
training data settings. ``write`` checks what it wrote: the folder's own processor must turn probe
conversations (images, video, two rounds, a system prompt) into the ids our data pipeline gives.

Image modes: ``square`` and ``pad`` (LLaVA-1.5's expand-to-square with the mean colour) are what
``LlavaImageProcessor`` does (resize to a square for SigLIP; shortest edge and center crop for CLIP);
``keep`` (no crop, a non-square grid) is not expressible: HF's LLaVA runs its tower at one image size.
"""
from __future__ import annotations

import json
import os

from neva.config import ModelConfig
from neva.data import images as imaging
from neva.data import templates, tokenize
from neva.data.config import DataConfig
from neva.hf import chat

SERVABLE_MODES = ("square", "pad")


def image_processor(cfg: ModelConfig, image_mode: str):
    """The HF image processor (PIL backend) that makes our ``neva.data.images.process`` pixels."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if image_mode not in SERVABLE_MODES:
        raise ValueError(f"data.image_mode={image_mode!r} cannot be exported: an HF image processor expresses "
                         f"{' and '.join(SERVABLE_MODES)} only (HF LLaVA runs its vision tower at one image size); "
                         f"train with data.image_mode=square or pad to export, or set checkpoint.export_hf=false")
    spec = imaging.spec_for(cfg.vision, image_mode)
    if isinstance(spec, dict) or spec.kind not in ("clip", "siglip"):
        raise ValueError(f"cannot write an image processor for model.vision.kind={cfg.vision.kind!r}: an HF LLaVA "
                         f"folder holds a clip or siglip tower")
    s = spec.size
    shape = dict(size={"shortest_edge": s}, do_center_crop=True) if spec.kind in imaging.CROPS else \
        dict(size={"height": s, "width": s}, do_center_crop=False)
    return LlavaImageProcessorPil(**shape, crop_size={"height": s, "width": s}, do_pad=image_mode == "pad",
                                  image_mean=list(spec.mean), image_std=list(spec.std), resample=3,
                                  do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)


def add_image_token(tok, image_token_id: int):
    """``<image>`` as a special token at ``image_token_id`` (appended: it must be the next free id)."""
    have = tok.convert_tokens_to_ids(chat.IMAGE) if chat.IMAGE in tok.get_vocab() else None
    if have == image_token_id:
        return tok
    if have is not None:
        raise ValueError(f"the tokenizer has {chat.IMAGE} at id {have} but the model's image_token_id is "
                         f"{image_token_id}: set model.image_token_id={have}")
    if image_token_id != len(tok):
        raise ValueError(f"cannot give {chat.IMAGE} the id {image_token_id}: the tokenizer has {len(tok)} tokens, so "
                         f"an added token gets id {len(tok)}; use model.image_token_id={len(tok)} (as "
                         f"neva.hf.vocab.add_image_token does) or a tokenizer that already has {chat.IMAGE} there")
    extra = [t for t in getattr(tok, "additional_special_tokens", None) or [] if t != chat.IMAGE]
    tok.add_special_tokens({"additional_special_tokens": extra + [chat.IMAGE]})
    if tok.convert_tokens_to_ids(chat.IMAGE) != image_token_id:
        raise RuntimeError(f"adding {chat.IMAGE} gave id {tok.convert_tokens_to_ids(chat.IMAGE)}, not {image_token_id}")
    return tok


def stop_ids(tok, template: str, eos_id: int | None) -> list[int]:
    """EOS and the template's end token (``<|eot_id|>``, ``<|im_end|>``, ``<extra_id_1>``, ...) as ids."""
    out = [eos_id] if eos_id is not None else []
    end = templates.get(template).end(tok.eos_token or "")
    ids = tok(end, add_special_tokens=False)["input_ids"] if end else []
    specials = set(tok.all_special_ids)
    if len(ids) == 1 or (ids and ids[-1] in specials):
        out.append(ids[-1])
    return list(dict.fromkeys(out))


def training_record(cfg: ModelConfig, data: DataConfig) -> dict:
    """What training used that config.json's HF fields do not say (stored as ``config.json["neva"]``)."""
    rec = {"template": data.template, "system_prompt": data.system_prompt, "tokenizer": data.tokenizer,
           "image_mode": data.image_mode, "num_frames": data.num_frames, "frames_per_video": data.frames_per_video,
           "splice_single_frame": data.splice_single_frame, "max_seq_len": data.max_seq_len}
    if cfg.llm.n_experts:
        # HF's Mixtral balance loss is top_k times ours, so its router_aux_loss_coef is ours / top_k
        rec.update(aux_loss_coef=cfg.llm.aux_loss_coef, z_loss_coef=cfg.llm.z_loss_coef,
                   aux_loss_note=f"router_aux_loss_coef = aux_loss_coef / top_k ({cfg.llm.top_k}): HF's Mixtral "
                                 f"load-balancing loss is top_k times neva's, so the two give the same loss")
    return rec


def write(folder: str, cfg: ModelConfig, tok, data: DataConfig) -> list[str]:
    """Write the serving files of an exported folder and check them; a config.json there (``neva.hf.save``
    writes it first) gets the training record."""
    from transformers import AutoTokenizer, GenerationConfig, LlavaProcessor

    data = data.validate()
    ip = image_processor(cfg, data.image_mode)
    templates.check_tokenizer(data.template, tok)
    ct = chat.chat_template(data.template, tok, system=data.system_prompt, frames_per_video=data.frames_per_video)
    tok.save_pretrained(folder)                   # a copy to change: ``tok`` may be shared (lru_cache)
    out = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    add_image_token(out, cfg.image_token_id)
    if out.pad_token is None and out.eos_token is not None:
        out.pad_token = out.eos_token             # batched generation pads (left) with EOS, as ours does
    out.chat_template = ct
    clip = cfg.vision.kind == "clip"
    strategy = "default" if clip and cfg.vision.select_feature == "patch" else "full"
    proc = LlavaProcessor(image_processor=ip, tokenizer=out, patch_size=cfg.vision.patch_size,
                          vision_feature_select_strategy=strategy, chat_template=ct,
                          num_additional_image_tokens=1 if clip else 0)
    proc.save_pretrained(folder)
    ip.save_pretrained(folder)                    # preprocessor_config.json too: transformers 4.x and vLLM read it
    lc = cfg.llm
    pad = lc.generation_pad_id
    GenerationConfig(bos_token_id=lc.bos_id, eos_token_id=stop_ids(tok, data.template, lc.eos_id),
                     pad_token_id=pad, do_sample=False).save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    if os.path.exists(path):                      # the weights' config (absent: a processor-only folder)
        with open(path) as f:
            conf = json.load(f)
        conf["neva"] = training_record(cfg, data)
        with open(path, "w") as f:
            json.dump(conf, f, indent=2)
    check(folder, cfg, tok, data)
    return sorted(os.listdir(folder))


def probes(template: str) -> list[list[templates.Turn]]:
    """Conversations that exercise every branch of a chat template: media at the start and in the
    middle, a video, two rounds (plain: one image only)."""
    T = templates.Turn
    if template == "plain":
        return [[T("user", "<image>\nDescribe it.")]]
    return [[T("user", "<image>\nWhat colour is the circle?")],
            [T("user", "Look <image>\nand <video>\nWhat moved?")],
            [T("user", "Hi."), T("assistant", "Hello. How can I help?"), T("user", "<image>\nHow many?")]]


def ours_ids(cfg: ModelConfig, tok, data: DataConfig, turns, system: str | None) -> list[int]:
    """The prompt ids our data pipeline gives ``turns`` (what ``NevaDataset.prompt`` does)."""
    pieces = templates.render(data.template, turns, bos=tok.bos_token or "", eos=tok.eos_token or "",
                              system=system if system is not None else data.system_prompt, generation=True)
    tags = [t for turn in turns for t in templates.media_tags_in(turn.text)]
    frames = [1 if t == chat.IMAGE else data.frames_per_video for t in tags]
    return tokenize.encode(pieces, tok, image_token_id=cfg.image_token_id, tokens_per_image=cfg.tokens_per_image,
                           frames=frames, require_trained=False).input_ids.tolist()


def check(folder: str, cfg: ModelConfig, tok, data: DataConfig) -> None:
    """The folder's own ``AutoProcessor`` renders probe conversations to the ids training gives; raise
    naming the first difference otherwise (a tokenizer whose behaviour the chat template cannot follow)."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
    size = cfg.vision.image_size
    systems = [None] if not templates.get(data.template).uses_system else [None, "Answer in one word."]
    for turns in probes(data.template):
        if data.frames_per_video < 1 and any(chat.VIDEO in t.text for t in turns):
            continue
        for system in systems:
            msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
                [{"role": t.role, "content": t.text} for t in turns]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            n = text.count(chat.IMAGE)
            got = proc(text=text, images=[Image.new("RGB", (size, size))] * n or None)["input_ids"][0]
            got = got.tolist() if hasattr(got, "tolist") else list(got)
            want = ours_ids(cfg, tok, data, turns, system)
            if got != want:
                i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                show = lambda ids: proc.tokenizer.convert_ids_to_tokens(ids[max(0, i - 3):i + 4])  # noqa: E731
                raise ValueError(f"{folder}: the exported chat template does not reproduce template {data.template} "
                                 f"with this tokenizer ({len(got)} vs {len(want)} ids; from id {i}: exported "
                                 f"{show(got)} vs training {show(want)}); the folder's weights are fine, but prompt "
                                 f"it with neva.data's template, or export with another data.template")
