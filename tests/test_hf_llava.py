"""Whole LLaVA models against transformers, the save / load round trips, both key layouts, sliced
(sharded) reads, torch.func.grad vs autograd, per-path init, and the errors bad checkpoints get."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import neva
import neva.hf
from neva.params import flatten

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
TOL = 1e-6      # observed: 0.0, and 4e-7 for Mixtral (expert sums in another order)
VOCAB = 320
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def randomize(model, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def make_siglip_mixtral(**text):
    """``text``: overrides of TEXT (e.g. num_key_value_heads)."""
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(**VISION),
        text_config=transformers.MixtralConfig(**{**TEXT, **text}, num_local_experts=4, num_experts_per_tok=2),
        image_token_index=300, vision_feature_select_strategy="full", vision_feature_layer=-2))


def make_clip_llama(**text):
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**{**TEXT, **text}, tie_word_embeddings=True),
        image_token_index=301, vision_feature_select_strategy="default", vision_feature_layer=-2))


@pytest.fixture(scope="session")
def llavas(tmp_path_factory):
    """{name: (hf model, folder)} for a SigLIP+Mixtral (untied) and a CLIP+Llama (tied) LLaVA."""
    root = tmp_path_factory.mktemp("hf_llava")
    out = {}
    for i, (name, make) in enumerate({"siglip_mixtral": make_siglip_mixtral, "clip_llama": make_clip_llama}.items()):
        torch.manual_seed(i)
        m = randomize(make(), seed=20 + i)
        m.save_pretrained(root / name)
        out[name] = (m, str(root / name))
    return out


def batch_for(cfg, with_labels: bool = False, left: bool = False) -> dict:
    """Sample 0: text, image, text, image, text. Sample 1: text only, 7 padding tokens on the right,
    or with ``left`` on the left (then with position_ids counted from the first real token, as
    generation does). Labels: the text after the first 3 real tokens of each row."""
    g = torch.Generator().manual_seed(5)
    P = cfg.tokens_per_image
    T = 2 * P + 10
    ids = torch.randint(0, 299, (2, T), generator=g)
    ids[0, 2:2 + P] = cfg.image_token_id
    ids[0, 6 + P:6 + 2 * P] = cfg.image_token_id
    am = torch.ones_like(ids)
    if left:
        am[1, :7] = 0
    else:
        am[1, T - 7:] = 0
    b = {"input_ids": ids, "attention_mask": am,
         "pixel_values": torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)}
    if left:
        b["position_ids"] = (am.cumsum(-1) - 1).clamp_min(0)
    if with_labels:
        labels = ids.masked_fill((ids == cfg.image_token_id) | (am == 0), -100)
        labels[0, :3] = -100
        labels[1, (7 if left else 0):(10 if left else 3)] = -100
        b["labels"] = labels
    return b


def hf_logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"]).logits


def max_err(ours, ref, b) -> float:
    keep = b["attention_mask"].bool()
    return (ours[keep] - ref[keep]).abs().max().item()


@pytest.mark.parametrize("name", ["siglip_mixtral", "clip_llama"])
def test_llava_matches_hf(llavas, name):
    hf, folder = llavas[name]
    cfg, params = neva.hf.load(folder)
    b = batch_for(cfg)
    with torch.no_grad():
        ours = neva.forward(params, cfg, b)["logits"]
    err = max_err(ours, hf_logits(hf, b), b)
    print(f"parity llava {name}: {err:.2e}")
    assert err < TOL
    assert cfg.vision.select_feature == "patch" and cfg.tokens_per_image == 16
    assert cfg.llm.tie_embeddings == (name == "clip_llama") and ("lm_head" in params["llm"]) != cfg.llm.tie_embeddings


def test_loss_matches_hf(llavas):
    """Labels aligned with input_ids, shift inside the loss, -100 ignored: as HF (dense backbone, no aux)."""
    hf, folder = llavas["clip_llama"]
    cfg, params = neva.hf.load(folder)
    b = batch_for(cfg, with_labels=True)
    with torch.no_grad():
        ref = hf(**{k: b[k] for k in ("input_ids", "pixel_values", "attention_mask", "labels")}).loss
        ours = neva.loss(params, cfg, b)
    assert abs(ours.item() - ref.item()) < TOL


@pytest.mark.parametrize("name", ["siglip_mixtral", "clip_llama"])
def test_save_then_transformers_from_pretrained(llavas, name, tmp_path):
    hf, folder = llavas[name]
    cfg, params = neva.hf.load(folder)
    files = neva.hf.save(params, cfg, str(tmp_path / "out"), max_shard_bytes=100_000)
    assert "model.safetensors.index.json" in files and len(files) > 3          # sharded
    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                            output_loading_info=True)
    assert not any(info.values()), info
    b = batch_for(cfg)
    assert max_err(hf_logits(back.eval(), b), hf_logits(hf, b), b) < TOL
    cfg2, params2 = neva.hf.load(str(tmp_path / "out"))                      # ours -> ours
    assert cfg2 == cfg
    f1, f2 = flatten(params), flatten(params2)
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)


def rewrite(src: str, dst, *, config=None, tensors=None) -> str:
    """Copy a single-file folder, editing its config dict and / or its {key: tensor} dict."""
    shutil.copytree(src, dst)
    if config is not None:
        d = json.loads((dst / "config.json").read_text())
        config(d)
        (dst / "config.json").write_text(json.dumps(d))
    if tensors is not None:
        sd = load_file(str(dst / "model.safetensors"))
        sd = tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def to_new_layout(sd: dict) -> dict:
    """The names transformers 4.52-4.57 wrote: model.language_model.*, model.vision_tower.*, lm_head."""
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        elif k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        else:
            k = "model." + k
        out[k] = v
    return out


def assert_same_params(a: dict, b: dict):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def test_layouts_all_read_the_same(llavas, tmp_path):
    hf, folder = llavas["siglip_mixtral"]
    cfg, params = neva.hf.load(folder)
    new = rewrite(folder, tmp_path / "new", tensors=to_new_layout)
    vm = rewrite(folder, tmp_path / "vm", tensors=lambda sd: {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in sd.items()})
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)     # 5.x's fused experts, model.* names
    fused_keys = set(load_file(str(tmp_path / "fused" / "model.safetensors")))
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in fused_keys
    for other in (new, vm, str(tmp_path / "fused")):
        cfg2, params2 = neva.hf.load(other)
        assert cfg2 == cfg
        assert_same_params(params, params2)


@pytest.mark.parametrize("fused", [False, True])
def test_shard_callback_reads_only_the_slice(llavas, tmp_path, fused):
    hf, folder = llavas["siglip_mixtral"]
    if fused:
        hf.save_pretrained(tmp_path / "fused", save_original_format=False)
        folder = str(tmp_path / "fused")
    _, full = neva.hf.load(folder)
    seen = {}

    def shard(path, shape):                  # a quarter-offset half of the first two dims
        idx = tuple(slice(n // 4, n // 4 + max(1, n // 2)) for n in shape[:2])
        seen[path] = idx
        return idx

    _, part = neva.hf.load(folder, shard=shard)
    ff, fp = flatten(full), flatten(part)
    assert seen.keys() == ff.keys()
    for k in ff:
        assert torch.equal(fp[k], ff[k][seen[k]]), k
    with pytest.raises(ValueError, match="llm/embed/w"):
        neva.hf.load(folder, shard=lambda p, s: (slice(0, s[0] + 1),) if p == "llm/embed/w" else None)


def test_func_grad_equals_autograd(llavas):
    _, folder = llavas["siglip_mixtral"]
    cfg, params = neva.hf.load(folder)
    b = batch_for(cfg, with_labels=True)
    g_func = torch.func.grad(neva.loss)(params, cfg, b)
    leaves = {k: v.detach().requires_grad_(True) for k, v in flatten(params).items()}
    loss = neva.loss(neva.params.unflatten(leaves), cfg, b)
    g_auto = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    gf = flatten(g_func)
    for (k, x), ga in zip(leaves.items(), g_auto):
        ga = torch.zeros_like(x) if ga is None else ga        # unused: vision layers past select_layer
        assert torch.allclose(gf[k], ga, rtol=1e-5, atol=1e-7), k
    assert gf["llm/layers/1/mlp/w1"].abs().sum() > 0 and gf["projector/fc1/w"].abs().sum() > 0


def test_init_is_per_path():
    """A leaf is drawn from (seed, path) alone: adding layers leaves every existing leaf's draw alone.
    Only the scale of wo / w2 moves, because their std is init_std / sqrt(2 * n_layers) by design."""
    base = neva.ModelConfig(vision=neva.config.tiny_vision("siglip"), llm=neva.config.tiny_llm("mixtral"),
                            image_token_id=255)
    bigger = dataclasses.replace(base, llm=dataclasses.replace(base.llm, n_layers=4),
                                 vision=dataclasses.replace(base.vision, n_layers=5))
    a, a2 = flatten(neva.init_params(base, 3)), flatten(neva.init_params(base, 3))
    b, c = flatten(neva.init_params(bigger, 3)), flatten(neva.init_params(base, 4))
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert set(a) < set(b)
    depth_scaled = ("attn/wo/w", "mlp/w2")
    ratio = (2 * base.llm.n_layers / (2 * bigger.llm.n_layers)) ** 0.5
    for k in a:
        if k.startswith("llm/layers/") and k.endswith(depth_scaled):
            assert torch.allclose(b[k], a[k] * ratio, rtol=1e-6, atol=0), k
        else:
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["llm/layers/0/attn/wq/w"], c["llm/layers/0/attn/wq/w"])


def test_load_parts_projector_is_fresh_init(tmp_path):
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).save_pretrained(tmp_path / "v")
    transformers.MistralForCausalLM(transformers.MistralConfig(**TEXT)).save_pretrained(tmp_path / "l")
    cfg, params = neva.hf.load_parts(str(tmp_path / "v"), str(tmp_path / "l"), projector="mlp2x_gelu", seed=7)
    assert cfg.image_token_id == VOCAB - 1 and cfg.projector.kind == "mlp2x_gelu"
    fresh = flatten(neva.init_params(cfg, 7)["projector"])
    assert all(torch.equal(v, flatten(params["projector"])[k]) for k, v in fresh.items())
    cfg3, p3 = neva.hf.load_parts(str(tmp_path / "v"), str(tmp_path / "l"), projector="mlp_downsample",
                                  image_token_id=5)
    assert "norm" in p3["projector"] and cfg3.image_token_id == 5
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        neva.hf.save(p3, cfg3, str(tmp_path / "no"))
    with pytest.raises(ValueError, match="CLIPVisionModel / SiglipVisionModel"):
        neva.hf.load_parts(str(tmp_path / "l"), str(tmp_path / "v"))


# -------------------------------------------------------------------------------- bad input
def set_in(*path_value):
    def edit(d):
        for path, value in path_value:
            *parents, last = path.split(".")
            node = d
            for p in parents:
                node = node[p]
            node[last] = value
    return edit


BAD_CONFIGS = [
    ("llava_next", set_in(("model_type", "llava_next")), "llava_next"),
    ("qwen2 text", set_in(("text_config.model_type", "qwen2")), "qwen2"),
    ("kv heads", set_in(("text_config.num_key_value_heads", 3)), "num_key_value_heads=3"),
    ("heads", set_in(("text_config.num_attention_heads", 5)), "hidden_size=64 does not divide into num_attention_heads=5"),
    ("vision heads", set_in(("vision_config.num_attention_heads", 5)), "num_attention_heads=5"),
    ("feature layers", set_in(("vision_feature_layer", [-2, -1])), "vision_feature_layer"),
    ("siglip default", set_in(("vision_feature_select_strategy", "default")), "SigLIP"),
    ("yarn", set_in(("text_config.rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})), "yarn"),
    ("act", set_in(("text_config.hidden_act", "gelu")), "hidden_act"),
    ("ffn shape", set_in(("text_config.intermediate_size", 80)),
     r"language_model\.model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight: found \(96, 64\), expected \(80, 64\)"),
]


@pytest.mark.parametrize("what,edit,match", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_named(llavas, tmp_path, what, edit, match):
    bad = rewrite(llavas["siglip_mixtral"][1], tmp_path / "bad", config=edit)
    with pytest.raises(ValueError, match=match):
        neva.hf.load(bad)


def test_missing_and_extra_tensors_are_named(llavas, tmp_path):
    folder = llavas["siglip_mixtral"][1]
    gone = "language_model.model.layers.1.self_attn.k_proj.weight"
    miss = rewrite(folder, tmp_path / "miss", tensors=lambda sd: {k: v for k, v in sd.items() if k != gone})
    with pytest.raises(ValueError, match=r"missing: language_model\.model\.layers\.1\.self_attn\.k_proj\.weight"):
        neva.hf.load(miss)
    new = "language_model.model.layers.0.self_attn.q_norm.weight"
    extra = rewrite(folder, tmp_path / "extra", tensors=lambda sd: {**sd, new: torch.ones(16)})
    with pytest.raises(ValueError, match=r"unexpected: .*q_norm"):
        neva.hf.load(extra)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "miss" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        neva.hf.load(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        neva.hf.load(str(tmp_path / "nowhere"))


def test_save_rejects_params_that_do_not_fit(llavas, tmp_path):
    cfg, params = neva.hf.load(llavas["clip_llama"][1])
    params["llm"]["layers"]["0"]["attn"]["wq"]["w"] = torch.zeros(32, 64)
    with pytest.raises(ValueError, match=r"llm/layers/0/attn/wq/w: found \(32, 64\), expected \(64, 64\)"):
        neva.hf.save(params, cfg, str(tmp_path / "x"))


def test_sparse_hub_config_takes_transformers_defaults():
    """llava-1.5-7b-hf's config.json lists only what differs from the defaults."""
    from neva.hf.translate import llava_config
    d = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
         "pad_token_id": 32001, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default",
         "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                         "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}}
    cfg = llava_config(d, "llava-1.5-7b-hf/config.json")
    assert (cfg.llm.dim, cfg.llm.n_layers, cfg.llm.n_heads, cfg.llm.n_kv_heads, cfg.llm.ffn_dim) == (4096, 32, 32, 32, 11008)
    assert cfg.llm.rope_theta == 10000.0 and cfg.llm.eps == 1e-5 and not cfg.llm.tie_embeddings
    assert (cfg.vision.kind, cfg.vision.act, cfg.vision.eps, cfg.vision.layers_used) == ("clip", "quick_gelu", 1e-5, 23)
    assert cfg.tokens_per_image == 576 and cfg.image_token_id == 32000
    sig = dict(d, vision_feature_select_strategy="full",
               vision_config={"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                              "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14})
    v = llava_config(sig, "sig").vision
    assert (v.kind, v.act, v.eps, v.dim, v.grid) == ("siglip", "gelu_tanh", 1e-6, 1152, 27)
    v = llava_config({k: x for k, x in d.items() if k != "vision_config"}, "no vision_config").vision
    assert (v.kind, v.dim, v.image_size, v.patch_size, v.n_layers) == ("clip", 1024, 336, 14, 24)


def test_projector_without_bias_round_trips(llavas, tmp_path):
    src = rewrite(llavas["clip_llama"][1], tmp_path / "nobias", config=set_in(("multimodal_projector_bias", False)),
                  tensors=lambda sd: {k: v for k, v in sd.items() if not k.startswith("multi_modal_projector.linear_")
                                      or k.endswith("weight")})
    cfg, params = neva.hf.load(src)
    assert not cfg.projector.bias and set(params["projector"]["fc1"]) == {"w"}
    neva.hf.save(params, cfg, str(tmp_path / "out"))
    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                            output_loading_info=True)
    assert not any(info.values()) and back.config.multimodal_projector_bias is False
    b = batch_for(cfg)
    with torch.no_grad():
        assert max_err(neva.forward(params, cfg, b)["logits"], hf_logits(back.eval(), b), b) < TOL
