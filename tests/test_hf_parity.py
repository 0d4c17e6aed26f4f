"""Parity with transformers on tiny random-weight models: each vision encoder at its selected layer and
each decoder as a causal LM, loaded through neva.hf from folders that transformers' own classes wrote.
fp32, max abs error within 1e-6."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import neva
import neva.hf
from neva.registry import ENCODERS
from neva.comm import LOCAL

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
TOL = 1e-6      # observed: 0.0, and 4e-7 for Mixtral (expert sums in another order)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter, so norms and biases are no longer ones / zeros and a swapped weight and
    bias (or scale and shift) would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------- vision
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)


@pytest.fixture(scope="session")
def vision_folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_vision")
    clip = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    sig = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)), seed=1)
    return {"clip": (clip, save(clip, root / "clip")), "siglip": (sig, save(sig, root / "siglip"))}


@pytest.mark.parametrize("kind,layer,feature", [("clip", -2, "patch"), ("clip", -1, "cls_patch"), ("clip", 1, "patch"),
                                                ("siglip", -2, "patch"), ("siglip", -1, "patch")])
def test_vision_encoder_matches_hf_hidden_state(vision_folders, kind, layer, feature):
    hf, folder = vision_folders[kind]
    vc, p = neva.hf.load_vision(folder, select_layer=layer, select_feature=feature)
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=pix, output_hidden_states=True).hidden_states[layer]
        ours = ENCODERS[vc.kind].apply(p, pix, vc, LOCAL)
    if kind == "clip" and feature == "patch":
        ref = ref[:, 1:]
    assert ours.shape == ref.shape == (3, vc.tokens_out, 48)
    err = (ours - ref).abs().max().item()
    print(f"parity {kind} layer {layer} {feature}: {err:.2e}")
    assert err < TOL


def test_full_clip_model_gives_its_vision_tower(vision_folders, tmp_path):
    hf, _ = vision_folders["clip"]
    full = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=hf.config.to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    full.vision_model.load_state_dict(hf.state_dict())
    vc, p = neva.hf.load_vision(save(full, tmp_path / "clipfull"))
    _, ref = neva.hf.load_vision(vision_folders["clip"][1])
    assert vc.kind == "clip" and all(torch.equal(a, b) for a, b in zip(
        neva.params.flatten(p).values(), neva.params.flatten(ref).values()))


# ---------------------------------------------------------------------------------- decoders
DEC = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
DECODERS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEC)),
    "llama31": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEC, rope_parameters=LLAMA31_ROPE)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**DEC, sliding_window=7)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **DEC, num_local_experts=4, num_experts_per_tok=2)),
    "nemotron": lambda: transformers.NemotronForCausalLM(transformers.NemotronConfig(
        **DEC, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
}


@pytest.fixture(scope="session")
def decoder_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_decoders")
    out = {}
    for i, (name, make) in enumerate(DECODERS.items()):
        torch.manual_seed(i)
        m = randomize(make(), seed=10 + i)
        out[name] = (m, save(m, root / name))
    return out


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_matches_hf_causal_lm(decoder_folders, vision_folders, name):
    hf, folder = decoder_folders[name]
    cfg, params = neva.hf.load_parts(vision_folders["siglip"][1], folder)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, 19:] = 0                                          # right padding in the second row
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).logits
        ours = neva.forward(params, cfg, {"input_ids": ids, "attention_mask": am})["logits"]
    keep = am.bool()
    err = (ours[keep] - ref[keep]).abs().max().item()
    print(f"parity {name}: {err:.2e} (logit std {ref.std():.3f})")
    assert err < TOL
    # the feature under test changes the logits (so the parity above is not vacuous)
    off = {"mistral": dict(sliding_window=None), "llama31": dict(rope_scaling=None)}.get(name)
    if off:
        plain = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **off))
        with torch.no_grad():
            other = neva.forward(params, plain, {"input_ids": ids, "attention_mask": am})["logits"]
        assert (other[keep] - ref[keep]).abs().max() > 100 * TOL
    if name == "nemotron":
        assert cfg.llm.rot_dim == cfg.llm.hd // 2 and cfg.llm.norm == "layernorm1p"
    if name == "mixtral":
        assert cfg.llm.n_experts == 4 and cfg.llm.top_k == 2


def test_llama31_v4_config_form_reads_the_same(decoder_folders, tmp_path):
    """transformers 4.x wrote rope_theta + rope_scaling (rope_type or legacy type) at the top level."""
    import json
    import shutil
    _, folder = decoder_folders["llama31"]
    want, _ = neva.hf.load_llm(folder)
    for key in ("rope_type", "type"):
        dst = tmp_path / key
        shutil.copytree(folder, dst)
        d = json.loads((dst / "config.json").read_text())
        rp = d.pop("rope_parameters")
        d["rope_theta"] = rp.pop("rope_theta")
        d["rope_scaling"] = {key: rp.pop("rope_type"), **rp}
        (dst / "config.json").write_text(json.dumps(d))
        got, _ = neva.hf.load_llm(str(dst))
        assert dataclasses.replace(got, from_pretrained=None) == dataclasses.replace(want, from_pretrained=None)


def test_defaults_table_matches_transformers():
    """A field missing from a config.json must take transformers' default for that model type."""
    from neva.hf.translate import DEFAULTS
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "mixtral": transformers.MixtralConfig, "nemotron": transformers.NemotronConfig,
               "clip_vision_model": transformers.CLIPVisionConfig,
               "siglip_vision_model": transformers.SiglipVisionConfig}
    for mt, cls in classes.items():
        c = cls()
        rope = getattr(c, "rope_parameters", None) or {}
        for key, want in DEFAULTS[mt].items():
            got = rope.get(key) if key in ("rope_theta", "partial_rotary_factor") else getattr(c, key)
            if key == "num_key_value_heads" and want is None:   # None means "as many as the query heads"
                assert got in (None, c.num_attention_heads), f"{mt}.{key}: transformers {got!r}"
                continue
            if key == "head_dim" and want is None:
                continue                                    # None means hidden_size // num_attention_heads
            assert got == want, f"{mt}.{key}: transformers {got!r}, ours {want!r}"


@pytest.mark.parametrize("name", list(DECODERS))
def test_export_of_each_backbone_loads_in_transformers(decoder_folders, vision_folders, name, tmp_path):
    """load_parts (CLIP + this decoder) -> neva.hf.save -> LlavaForConditionalGeneration: no missing or
    unexpected keys, and its logits on an image+text batch are ours."""
    cfg, params = neva.hf.load_parts(vision_folders["clip"][1], decoder_folders[name][1], seed=1)
    neva.hf.save(params, cfg, str(tmp_path / "llava"))
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava"),
                                                                          output_loading_info=True)
    assert not any(info.values()), info
    P = cfg.tokens_per_image
    ids = torch.randint(0, 300, (1, P + 12), generator=torch.Generator().manual_seed(4))
    ids[0, 3:3 + P] = cfg.image_token_id
    pix = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, pixel_values=pix).logits
        ours = neva.forward(params, cfg, {"input_ids": ids, "pixel_values": pix})["logits"]
    assert (ours - ref).abs().max().item() < TOL
