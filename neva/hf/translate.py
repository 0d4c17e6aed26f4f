"""config.json <-> our configs, for LLaVA, CLIP / SigLIP / DINOv2 vision towers and Llama / Mistral /
Mixtral / Nemotron decoders.

Reads both config generations: transformers 4.x (``rope_theta``, ``rope_scaling`` with ``rope_type``
or ``type``, a top-level ``partial_rotary_factor``) and 5.x (``rope_parameters`` holding all of them).
A field missing from a config.json takes the default of that model type's transformers config class
(``DEFAULTS``; a test keeps the table equal to transformers'), as ``from_pretrained`` would.
Writing emits both generations' rope fields, so 4.x and 5.x readers (and vLLM) agree.

Anything our model cannot express (biases in the decoder, other rope types, a list of vision feature
layers, SigLIP with the "default" strategy ...) is an error that names the field and the folder.
"""
from __future__ import annotations

from dataclasses import replace

from neva.config import LLMConfig, ModelConfig, ProjectorConfig, RopeScaling, VisionConfig

LLM_TYPES = ("llama", "mistral", "mixtral", "nemotron")
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "dinov2": "dino",
                "dinov2_with_registers": "dino"}

_DECODER = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                head_dim=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                hidden_act="silu", rope_theta=10000.0)
DEFAULTS: dict[str, dict] = {
    "llama": dict(_DECODER, intermediate_size=11008, num_key_value_heads=None, rms_norm_eps=1e-6,
                  max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    "mistral": dict(_DECODER, intermediate_size=14336, num_key_value_heads=8, rms_norm_eps=1e-6,
                    max_position_embeddings=131072, sliding_window=4096),
    "mixtral": dict(_DECODER, intermediate_size=14336, num_key_value_heads=8, rms_norm_eps=1e-5,
                    max_position_embeddings=131072, sliding_window=None, rope_theta=1e6,
                    num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    "nemotron": dict(_DECODER, vocab_size=256000, hidden_size=6144, intermediate_size=24576,
                     num_attention_heads=48, num_key_value_heads=None, norm_eps=1e-5,
                     max_position_embeddings=4096, hidden_act="relu2", partial_rotary_factor=0.5,
                     bos_token_id=2, eos_token_id=3, attention_bias=False, mlp_bias=False),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, num_channels=3),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=224,
                   patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, num_channels=3, qkv_bias=True,
                   use_swiglu_ffn=False),
    "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                  image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                                  num_channels=3, qkv_bias=True, use_swiglu_ffn=False, num_register_tokens=4),
    # LlavaConfig: its default vision tower (CLIP ViT-L/14-336) and llama text config
    "llava": dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
                  vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False),
    "llava_vision": dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                         image_size=336, num_hidden_layers=24, num_attention_heads=16),
}
VISION_ACTS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


class Fields:
    """A config.json dict with its model type's defaults; ``get`` names the file in errors."""

    def __init__(self, d: dict, model_type: str, where: str):
        self.d, self.defaults, self.where = d, DEFAULTS[model_type], where

    def get(self, key: str, default=...):
        if key in self.d:
            return self.d[key]
        if key in self.defaults:
            return self.defaults[key]
        if default is ...:
            raise KeyError(f"{self.where}: field {key!r} is missing and has no default")
        return default


# ------------------------------------------------------------------------------------- reading
def _rope(f: Fields, mt: str) -> tuple[float, RopeScaling | None, float]:
    """-> (theta, scaling, partial rotary factor) from either config generation."""
    rp = f.d.get("rope_parameters")
    if rp is not None:                                  # transformers 5.x
        if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
            raise ValueError(f"{f.where}: rope_parameters={rp!r}: only one rope for all layers is supported")
        params = rp
        theta = rp.get("rope_theta", f.get("rope_theta"))
    else:                                               # transformers 4.x
        params = f.d.get("rope_scaling") or {}
        theta = f.get("rope_theta")
    partial = params.get("partial_rotary_factor", f.d.get("partial_rotary_factor",
                                                          f.defaults.get("partial_rotary_factor", 1.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    field = "rope_parameters" if rp is not None else "rope_scaling"
    if kind == "default":
        return float(theta), None, float(partial)
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}
    if kind not in need:
        raise ValueError(f"{f.where}: {field} rope_type={kind!r} is not supported; use default, linear or llama3")
    missing = [k for k in need[kind] if k not in params]
    if missing:
        raise ValueError(f"{f.where}: {field} of rope_type {kind} lacks {missing}")
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(params["factor"])), float(partial)
    return float(theta), RopeScaling(kind="llama3", factor=float(params["factor"]),
                                     low_freq_factor=float(params["low_freq_factor"]),
                                     high_freq_factor=float(params["high_freq_factor"]),
                                     original_max_position=int(params["original_max_position_embeddings"])), float(partial)


def _first(x):
    return x[0] if isinstance(x, list) else x


def llm_config(d: dict, where: str) -> LLMConfig:
    """A decoder config.json (or LLaVA's text_config) -> LLMConfig."""
    mt = d.get("model_type", "llama")
    if mt not in LLM_TYPES:
        raise ValueError(f"{where}: text model_type {mt!r} is not supported; use one of {LLM_TYPES}")
    f = Fields(d, mt, where)
    for key in ("attention_bias", "mlp_bias"):
        if f.get(key, False):
            raise ValueError(f"{where}: {key}=true is not supported (our decoder has no biases)")
    act = f.get("hidden_act")
    want = "relu2" if mt == "nemotron" else "silu"
    if act != want:
        raise ValueError(f"{where}: hidden_act={act!r} for {mt} is not supported; expected {want!r}")
    heads = int(f.get("num_attention_heads"))
    kv = f.get("num_key_value_heads") or heads
    dim = int(f.get("hidden_size"))
    hd = f.get("head_dim")
    if hd is None and dim % heads:
        raise ValueError(f"{where}: hidden_size={dim} does not divide into num_attention_heads={heads} "
                         f"and head_dim is not set")
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    theta, scaling, partial = _rope(f, mt)
    n_exp = int(f.get("num_local_experts")) if mt == "mixtral" else 0
    top_k = int(f.get("num_experts_per_tok")) if mt == "mixtral" else 2
    cfg = LLMConfig(
        kind=mt, vocab_size=int(f.get("vocab_size")), dim=dim, n_layers=int(f.get("num_hidden_layers")),
        n_heads=heads, n_kv_heads=int(kv), head_dim=None if hd is None or hd == dim // heads else int(hd),
        ffn_dim=int(f.get("intermediate_size")), mlp="relu2" if mt == "nemotron" else "swiglu",
        norm="layernorm1p" if mt == "nemotron" else "rms",
        eps=float(f.get("norm_eps" if mt == "nemotron" else "rms_norm_eps")),
        rope_theta=theta, rope_scaling=scaling, rotary_pct=partial,
        sliding_window=f.get("sliding_window", None) if mt in ("mistral", "mixtral") else None,
        tie_embeddings=bool(f.get("tie_word_embeddings")), max_position=int(f.get("max_position_embeddings")),
        n_experts=n_exp, top_k=top_k,
        # HF's Mixtral balance loss is top_k times ours (see neva/layers/moe.py): same total loss
        aux_loss_coef=float(f.get("router_aux_loss_coef")) * top_k if n_exp else 0.01,
        bos_id=_first(f.get("bos_token_id")), eos_id=_first(f.get("eos_token_id")), pad_id=f.get("pad_token_id"))
    if cfg.rot_dim % 2:
        raise ValueError(f"{where}: head_dim {cfg.hd} x partial_rotary_factor {partial} gives an odd rotary dim")
    return cfg


def vision_config(d: dict, where: str, select_layer: int = -2, select_feature: str = "patch") -> VisionConfig:
    """A CLIP / SigLIP vision config.json (or LLaVA's vision_config) -> VisionConfig."""
    mt = d.get("model_type")
    if mt not in VISION_TYPES:
        raise ValueError(f"{where}: vision model_type {mt!r} is not supported; use one of {list(VISION_TYPES)}")
    f = Fields(d, mt, where)
    if f.get("num_channels") != 3:
        raise ValueError(f"{where}: num_channels={f.get('num_channels')}; only RGB (3) is supported")
    act = f.get("hidden_act")
    if act not in VISION_ACTS:
        raise ValueError(f"{where}: vision hidden_act={act!r} is not supported; use one of {list(VISION_ACTS)}")
    dim, heads = int(f.get("hidden_size")), int(f.get("num_attention_heads"))
    if dim % heads:
        raise ValueError(f"{where}: vision hidden_size={dim} does not divide into num_attention_heads={heads}")
    extra: dict = {}
    if mt.startswith("dinov2"):
        extra = _dino_fields(f, where)
    cfg = VisionConfig(kind=VISION_TYPES[mt], image_size=int(f.get("image_size")), patch_size=int(f.get("patch_size")),
                       dim=dim, n_layers=int(f.get("num_hidden_layers")), n_heads=heads,
                       mlp_dim=extra.pop("mlp_dim", None) or int(f.get("intermediate_size")),
                       eps=float(f.get("layer_norm_eps")), act=VISION_ACTS[act], select_layer=select_layer,
                       select_feature=select_feature, **extra)
    if not -cfg.n_layers - 1 <= select_layer <= cfg.n_layers:
        raise ValueError(f"{where}: vision feature layer {select_layer} is out of range for "
                         f"{cfg.n_layers} layers (hidden_states has {cfg.n_layers + 1} entries)")
    return cfg


def _dino_fields(f: Fields, where: str) -> dict:
    """What a Dinov2 / Dinov2WithRegisters config adds: the MLP width from ``mlp_ratio``, register
    tokens, and the position table's image size (the input size starts equal; change ``image_size``
    to run at another size, as HF does with ``interpolate_pos_encoding``)."""
    if f.get("use_swiglu_ffn"):
        raise ValueError(f"{where}: use_swiglu_ffn=true (DINOv2 giant) is not supported; only the GELU MLP is")
    if not f.get("qkv_bias"):
        raise ValueError(f"{where}: qkv_bias=false is not supported (our DINOv2 attention has q, k, v biases)")
    regs = int(f.get("num_register_tokens", 0))
    if f.d.get("model_type") == "dinov2_with_registers" and regs == 0:
        raise ValueError(f"{where}: a dinov2_with_registers model with num_register_tokens=0: HF resamples its "
                         f"positions with antialias, which we tie to having registers; save it as a dinov2 model")
    return dict(mlp_dim=int(int(f.get("hidden_size")) * f.get("mlp_ratio")), n_registers=regs,
                pos_image_size=int(f.get("image_size")))


def select_feature(kind: str, strategy: str, where: str) -> str:
    """HF's vision_feature_select_strategy -> our select_feature. HF's "default" drops the first token,
    which is CLIP's class token but a real patch for SigLIP (so no SigLIP LLaVA uses it)."""
    if strategy not in ("default", "full"):
        raise ValueError(f"{where}: vision_feature_select_strategy={strategy!r}; use default or full")
    if kind == "clip":
        return "patch" if strategy == "default" else "cls_patch"
    if strategy == "default":
        raise ValueError(f"{where}: vision_feature_select_strategy='default' with a SigLIP tower makes HF drop a "
                         f"real patch token (SigLIP has no class token); use 'full'")
    return "patch"


def llava_config(d: dict, where: str) -> ModelConfig:
    """A LlavaForConditionalGeneration config.json -> ModelConfig (projector mlp2x_gelu)."""
    arch = d.get("architectures") or ["LlavaForConditionalGeneration"]
    if d.get("model_type") != "llava" or "LlavaForConditionalGeneration" not in arch:
        raise ValueError(f"{where}: model_type={d.get('model_type')!r}, architectures={arch}: load() reads "
                         f"LlavaForConditionalGeneration folders (model_type 'llava'); for a separate vision and "
                         f"language model use neva.hf.load_parts")
    f = Fields(d, "llava", where)
    layer = f.get("vision_feature_layer")
    if not isinstance(layer, int):
        raise ValueError(f"{where}: vision_feature_layer={layer!r}: only a single int layer is supported")
    if f.get("projector_hidden_act") != "gelu":
        raise ValueError(f"{where}: projector_hidden_act={f.get('projector_hidden_act')!r}; only gelu is supported")
    # LlavaConfig: no vision_config at all means its CLIP ViT-L/14-336; a partial one fills in from
    # its own model type's defaults
    vd = dict(d["vision_config"]) if d.get("vision_config") else dict(DEFAULTS["llava_vision"])
    vd.setdefault("model_type", "clip_vision_model")
    kind = VISION_TYPES.get(vd.get("model_type"))
    if kind is None:
        raise ValueError(f"{where}: vision_config.model_type={vd.get('model_type')!r} is not supported; "
                         f"use one of {list(VISION_TYPES)}")
    sel = select_feature(kind, f.get("vision_feature_select_strategy"), where)
    td = dict(d.get("text_config") or {"model_type": "llama"})
    lc = llm_config(td, f"{where} text_config")
    if bool(d.get("tie_word_embeddings", False)) and not lc.tie_embeddings:
        lc = replace(lc, tie_embeddings=True)            # LlavaConfig forwards either flag
    image_token = d.get("image_token_index", d.get("image_token_id", DEFAULTS["llava"]["image_token_index"]))
    cfg = ModelConfig(vision=vision_config(vd, f"{where} vision_config", layer, sel),
                      projector=ProjectorConfig("mlp2x_gelu", bias=bool(f.get("multimodal_projector_bias"))),
                      llm=lc, image_token_id=int(image_token))
    try:
        return cfg.validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------- writing
def llm_json(c: LLMConfig) -> dict:
    """LLMConfig -> an HF text_config, checking that the HF architecture can express it."""
    want_moe, mt = c.n_experts > 0, c.kind
    if mt not in LLM_TYPES:
        raise ValueError(f"model.llm.kind={mt!r} has no HF architecture; use one of {LLM_TYPES}")
    problems = []
    if want_moe != (mt == "mixtral"):
        problems.append(f"n_experts={c.n_experts} with kind={mt} (MoE is kind=mixtral only)")
    if (c.mlp, c.norm) != (("relu2", "layernorm1p") if mt == "nemotron" else ("swiglu", "rms")):
        problems.append(f"mlp={c.mlp}, norm={c.norm} with kind={mt} (HF {mt} fixes these)")
    if c.sliding_window is not None and mt not in ("mistral", "mixtral"):
        problems.append(f"sliding_window={c.sliding_window} with kind={mt} (HF {mt} has none; use mistral)")
    if c.rotary_pct != 1.0 and mt != "nemotron":
        problems.append(f"rotary_pct={c.rotary_pct} with kind={mt} (partial rotary is nemotron only)")
    if problems:
        raise ValueError("cannot export to Hugging Face: " + "; ".join(problems))
    rope: dict = {"rope_type": "default", "rope_theta": c.rope_theta}
    scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                           original_max_position_embeddings=s.original_max_position)
        rope.update(scaling)
    out = {"model_type": mt, "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
           "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
           "head_dim": c.hd, "hidden_act": "relu2" if mt == "nemotron" else "silu",
           "max_position_embeddings": c.max_position, "tie_word_embeddings": c.tie_embeddings,
           "bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "pad_token_id": c.pad_id,
           "rope_theta": c.rope_theta, "rope_scaling": scaling, "rope_parameters": rope}
    out["norm_eps" if mt == "nemotron" else "rms_norm_eps"] = c.eps
    if mt in ("llama", "nemotron"):
        out.update(attention_bias=False, mlp_bias=False)
    if mt == "nemotron":
        out["partial_rotary_factor"] = c.rotary_pct
        rope["partial_rotary_factor"] = c.rotary_pct
    if mt in ("mistral", "mixtral"):
        out["sliding_window"] = c.sliding_window
    if mt == "mixtral":
        out.update(num_local_experts=c.n_experts, num_experts_per_tok=c.top_k,
                   router_aux_loss_coef=c.aux_loss_coef / c.top_k)
    return out


def vision_json(v: VisionConfig) -> dict:
    act = {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}.get(v.act)
    if act is None:
        raise ValueError(f"model.vision.act={v.act!r} has no HF equivalent; use quick_gelu, gelu_tanh or gelu")
    mt = "clip_vision_model" if v.kind == "clip" else "siglip_vision_model"
    out = {"model_type": mt, "hidden_size": v.dim, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.n_layers,
           "num_attention_heads": v.n_heads, "image_size": v.image_size, "patch_size": v.patch_size,
           "hidden_act": act, "layer_norm_eps": v.eps, "num_channels": 3}
    if v.kind == "siglip":
        out["vision_use_head"] = False       # LLaVA never runs the pooling head; we keep no weights for it
    return out


def llava_json(cfg: ModelConfig, dtype_name: str) -> dict:
    """ModelConfig -> LlavaForConditionalGeneration config.json."""
    if cfg.vision.towers:
        raise ValueError(f"cannot export model.vision.kind={cfg.vision.kind!r} (towers "
                         f"{' + '.join(t.kind for t in cfg.vision.towers)}) to Hugging Face: transformers has no LLaVA "
                         f"class for an encoder whose towers' features are concatenated. Keep the neva checkpoint "
                         f"(it loads with neva.train.checkpoint in any layout), or train a single clip or siglip tower "
                         f"to export; with the main job, set checkpoint.export_hf=false")
    if cfg.vision.kind not in ("clip", "siglip"):
        raise ValueError(f"cannot export model.vision.kind={cfg.vision.kind!r} to Hugging Face: LLaVA folders hold a "
                         f"CLIP or SigLIP vision tower. Keep the neva checkpoint; with the main job, set "
                         f"checkpoint.export_hf=false")
    if cfg.projector.kind != "mlp2x_gelu":
        raise ValueError(f"cannot export projector {cfg.projector.kind!r}: HF LLaVA's projector is mlp2x_gelu "
                         f"(linear, GELU, linear); train with model.projector.kind=mlp2x_gelu to export")
    if cfg.projector.frame_pool != 1:
        raise ValueError(f"cannot export model.projector.frame_pool={cfg.projector.frame_pool}: HF's "
                         "LlavaForConditionalGeneration gives every image and video frame the same "
                         f"{cfg.tokens_per_image} tokens and has no frame pooling (LlavaNextVideo pools, but "
                         "with AnyRes image tiles and its own token layout, which this model does not have); "
                         "export a model trained with frame_pool=1, or use the DCP checkpoint")
    v = cfg.vision
    strategy = ("default" if v.select_feature == "patch" else "full") if v.kind == "clip" else "full"
    text = llm_json(cfg.llm)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": dtype_name,
            "torch_dtype": dtype_name, "image_token_index": cfg.image_token_id,
            "image_seq_length": cfg.tokens_per_image, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": cfg.projector.bias, "vision_feature_layer": v.select_layer,
            "vision_feature_select_strategy": strategy, "tie_word_embeddings": cfg.llm.tie_embeddings,
            "text_config": text, "vision_config": vision_json(v)}
