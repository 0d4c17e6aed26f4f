"""DINOv2 against transformers' Dinov2Model / Dinov2WithRegistersModel, and the fused DINOv2 + SigLIP
encoder: built from registered parts, fed per-tower pixels by the data pipeline, sharded by the plan
(same gradients as one process), saved and resumed by our checkpoints, refused by the HF export."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import neva
import neva.hf
from neva import experiment as X
from neva.comm import LOCAL
from neva.config import ModelConfig, fuse, tiny_llm, tiny_vision
from neva.data import DataConfig, build_loader
from neva.data import images as imaging
from neva.parallel.plan import Layout
from neva.registry import ENCODERS
from neva.testing import check_step, gather, local_world, max_rel_err, reference_grads, sharded_grads
from neva.testing.runs import train_segment
from train_helpers import batch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# --------------------------------------------------------------------------------- DINOv2 parity
@pytest.fixture(scope="module")
def dino_folders(tmp_path_factory):
    """Tiny random Dinov2Model and Dinov2WithRegistersModel (2 registers), position table for 40 px
    images in 8 px patches (5 x 5), every weight perturbed so ones and zeros would not hide a swap."""
    root, out = tmp_path_factory.mktemp("dino"), {}
    common = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=40, patch_size=8, mlp_ratio=2)
    for name, cls, ccls, kw in [("dinov2", transformers.Dinov2Model, transformers.Dinov2Config, {}),
                                ("registers", transformers.Dinov2WithRegistersModel,
                                 transformers.Dinov2WithRegistersConfig, {"num_register_tokens": 2})]:
        torch.manual_seed(0)
        m = cls(ccls(**common, **kw))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.eval().save_pretrained(root / name)
        out[name] = (m, str(root / name))
    return out


@pytest.mark.parametrize("name", ["dinov2", "registers"])
@pytest.mark.parametrize("size,layer,feature", [(40, -2, "patch"), (32, -2, "patch"), (56, -1, "cls_patch"),
                                                (32, 1, "cls_patch")])
def test_dino_matches_hf_hidden_state(dino_folders, name, size, layer, feature):
    """At the table's own size (40 px) and resampled to 32 and 56 px (HF's interpolate_pos_encoding,
    antialiased for the with-registers model): HF's hidden_states[layer] without the register tokens."""
    hf, folder = dino_folders[name]
    vc, p = neva.hf.load_vision(folder, select_layer=layer, select_feature=feature)
    vc = replace(vc, image_size=size)
    assert vc.kind == "dino" and vc.n_registers == (2 if name == "registers" else 0) and vc.pos_image_size == 40
    pix = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = hf(pixel_values=pix, output_hidden_states=True).hidden_states[layer]
        ours = ENCODERS["dino"].apply(p, pix, vc, LOCAL)
    patches = hs[:, 1 + vc.n_registers:]
    ref = torch.cat([hs[:, :1], patches], 1) if feature == "cls_patch" else patches
    assert ours.shape == ref.shape == (2, vc.tokens_out, 48)
    assert (ours - ref).abs().max().item() < 1e-5


def test_dino_defaults_match_transformers():
    from neva.hf.translate import DEFAULTS
    for mt, cls in {"dinov2": transformers.Dinov2Config,
                    "dinov2_with_registers": transformers.Dinov2WithRegistersConfig}.items():
        c = cls()
        for key, want in DEFAULTS[mt].items():
            assert getattr(c, key) == want, f"{mt}.{key}: transformers {getattr(c, key)!r}, ours {want!r}"


def test_dino_pixels_match_the_hf_processor():
    """DINOv2's BitImageProcessor with its crop equal to its size: our dino ImageSpec, square and pad."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    hf = BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=imaging.IMAGENET_MEAN, image_std=imaging.IMAGENET_STD)
    rs = np.random.RandomState(0)
    for h, w in [(40, 57), (57, 40), (32, 32)]:
        img = Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8))
        for mode in ("square", "pad"):
            src = img if mode == "square" else imaging.expand_to_square(img, tuple(int(m * 255) for m in hf.image_mean))
            ref = hf(src, return_tensors="pt")["pixel_values"][0]
            assert (imaging.process(img, imaging.ImageSpec("dino", 32, mode)) - ref).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------- the fused encoder
def fused_cfg(**tower_kw) -> ModelConfig:
    """tiny one-layer DINOv2 (1 register, 5x5 table resampled to 4x4) + SigLIP, both 4x4 patches -> a
    one-layer Llama (the towers are what these tests are about)."""
    towers = (tiny_vision("dino", n_layers=1, **tower_kw), tiny_vision("siglip", n_layers=1))
    return ModelConfig(vision=fuse(*towers), llm=tiny_llm("llama2", n_layers=1, n_kv_heads=4),
                       image_token_id=255).validate()


def fused_batch(cfg: ModelConfig, B: int = 4, seed: int = 0) -> dict:
    """``batch``'s rows, each image given to the towers as two different tensors (their own preprocessing)."""
    b = batch(cfg, B=B, seed=seed)
    pix = b["pixel_values"]
    b["pixel_values"] = {"dino": pix, "siglip": pix.flip(-1) * 0.5}
    return b


def test_fused_features_are_the_towers_concatenated():
    cfg = fused_cfg()
    p = neva.init_params(cfg, 0)
    assert set(p["vision"]) == {"dino", "siglip"} and cfg.vision.dim == 96 and cfg.tokens_per_image == 16
    pix = fused_batch(cfg)["pixel_values"]
    feats = ENCODERS["fused"].apply(p["vision"], pix, cfg.vision, LOCAL)
    d, s = cfg.vision.towers
    assert torch.equal(feats[..., :48], ENCODERS["dino"].apply(p["vision"]["dino"], pix["dino"], d, LOCAL))
    assert torch.equal(feats[..., 48:], ENCODERS["siglip"].apply(p["vision"]["siglip"], pix["siglip"], s, LOCAL))
    grads = torch.func.grad(neva.loss)(p, cfg, fused_batch(cfg))
    assert all(float(grads["vision"][k]["patch"]["w"].abs().sum()) > 0 for k in ("dino", "siglip"))


def test_fused_towers_must_agree_on_the_grid():
    with pytest.raises(ValueError, match=r"towers give different tokens per image: dino 16 \(image_size 32 / patch_size 8\), "
                                         r"siglip 36 \(image_size 48.*grids must agree"):
        ModelConfig(vision=fuse(tiny_vision("dino"), tiny_vision("siglip", image_size=48)), llm=tiny_llm(),
                    image_token_id=255).validate()
    with pytest.raises(ValueError, match="with the class token"):        # 17 tokens against 16
        fused_cfg(select_feature="cls_patch")
    with pytest.raises(ValueError, match=r"model.vision.kind=fused needs two or more towers.*fuse\("):
        ModelConfig(vision=replace(tiny_vision(), kind="fused"), llm=tiny_llm(), image_token_id=255).validate()
    with pytest.raises(ValueError, match=r"model.vision.dim=100 must be .* 48 \+ 48 = 96"):
        replace(fused_cfg(), vision=replace(fused_cfg().vision, dim=100)).validate()
    cfg = fused_cfg()
    with pytest.raises(ValueError, match=r"takes pixel_values as a dict with one entry per tower \['dino', 'siglip'\]"):
        neva.loss(neva.init_params(cfg), cfg, batch(cfg))


def test_fused_sharded_step_equals_one_process():
    """tp2 x dp2 in a simulated world: both towers' attention heads and MLPs split over tp, each data
    rank its own rows and their per-tower pixels; the real step's gradients equal one process's."""
    cfg = fused_cfg()
    params, b = neva.init_params(cfg, 1), fused_batch(cfg, B=4)
    ref_stats, ref = reference_grads(params, cfg, b, n_micro=2)
    with local_world(cfg, Layout(tp=2, dp=2)) as (par, mode):
        pl = par.placements()
        assert pl["vision/dino/layers/0/attn/wq/w"] == ("tp", None) and pl["vision/siglip/layers/0/mlp/fc2/w"] == (None, "tp")
        stats, grads = sharded_grads(par, params, cfg, b, mode=mode)
        full = gather(par, grads, mode)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    assert max_rel_err(ref, full) < 1e-4


def test_fused_pipeline_on_gloo_equals_one_process(gloo_pool):
    """tp2 x pp2 on four gloo processes: the fused encoder on stage 0 of the 1F1B schedule."""
    cfg = replace(fused_cfg(), llm=tiny_llm("llama2", n_layers=2, n_kv_heads=4))
    params, b = neva.init_params(cfg, 2), fused_batch(cfg, B=4, seed=1)
    res = gloo_pool.run(check_step, cfg, Layout(tp=2, pp=2), params, b, 2)[0]
    assert res["stats"]["loss"] == pytest.approx(res["stats_ref"]["loss"], rel=1e-5)
    assert res["grad_err"] < 1e-4


def test_fused_checkpoint_resumes_where_it_stopped(tmp_path):
    """2 steps in one go == 1 step, a checkpoint (both towers, their optimizer state), 1 step resumed."""
    cfg = fused_cfg()
    params, batches = neva.init_params(cfg, 3), [fused_batch(cfg, seed=s) for s in range(2)]
    straight = train_segment(None, None, cfg, params, batches, 0, 2, str(tmp_path / "a"))
    first = train_segment(None, None, cfg, params, batches, 0, 1, str(tmp_path / "b"))
    second = train_segment(None, None, cfg, params, batches, 1, 2, str(tmp_path / "b"))
    assert first + second == straight


def test_fused_config_round_trips_and_takes_tower_overrides(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    import fused_dino_siglip as job

    exp = X.parse(["model.vision.towers.0.select_layer=-2", "train.steps=5"], job.base())
    assert [t.kind for t in exp.model.vision.towers] == ["dino", "siglip"]
    assert exp.model.vision.towers[0].select_layer == -2 and exp.model.vision.towers[1].select_layer == -1
    assert X.load(X.save(exp, tmp_path)) == exp
    with pytest.raises(X.ConfigError, match="fused needs two or more towers"):
        X.parse(["model.vision.kind=fused"], job.main_job.base())
    with pytest.raises(X.ConfigError, match="no LLaVA class for an encoder whose towers"):
        job.main_job.check_export(replace(exp, checkpoint=replace(exp.checkpoint, export_hf=True)))


def test_hf_export_refuses_the_fused_encoder(tmp_path):
    cfg = fused_cfg()
    with pytest.raises(ValueError, match=r"cannot export model.vision.kind='fused' \(towers dino \+ siglip\).*no LLaVA class"):
        neva.hf.save(neva.init_params(cfg), cfg, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_data_gives_each_tower_its_own_preprocessing():
    """The dataset processes every image (and video frame) once per tower; the loader's batches carry
    {tower: pixels} and train the fused model."""
    from data_helpers import synth_dir, tiny_model

    cfg = replace(tiny_model("mixtral"), vision=fuse(tiny_vision("dino", n_layers=1), tiny_vision("siglip", n_layers=1)))
    root = synth_dir()
    data = DataConfig(data_path=f"{root}/train.jsonl,{root}/video_train.jsonl", video_folder=f"{root}/videos.tar",
                      batch_size=4, num_workers=0, num_frames=2, max_seq_len=256)
    loader = build_loader(data, cfg)
    ds = loader.ds
    spec = imaging.spec_for(cfg.vision)
    assert spec == {"dino": imaging.ImageSpec("dino", 32), "siglip": imaging.ImageSpec("siglip", 32)}
    s = ds[0]
    img = imaging.open_image(ds.sources[ds.source_of[0]].image_root / ds.records[0].images[0])
    for k in ("dino", "siglip"):
        assert torch.equal(s.pixel_values[k][0], imaging.process(img, spec[k]))
    assert not torch.allclose(s.pixel_values["dino"], s.pixel_values["siglip"])
    b = next(iter(loader))
    n = int((b["input_ids"] == cfg.image_token_id).sum()) // cfg.tokens_per_image
    assert b["pixel_values"]["dino"].shape == b["pixel_values"]["siglip"].shape == (n, 3, 32, 32)
    assert torch.isfinite(neva.loss(neva.init_params(cfg), cfg, b))
    v = len(ds.records) - 1                                         # the last file is video
    assert ds[v].pixel_values["dino"].shape[0] == ds[v].pixel_values["siglip"].shape[0] == 2
