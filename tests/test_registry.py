"""Composition by name: a part registered from outside ``neva/`` builds, runs, trains and shards
like the built-in ones; an unknown name is an error listing what is registered."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from neva import comm, model
from neva.config import ModelConfig, ProjectorConfig, VisionConfig, tiny_llm, tiny_vision
from neva.layers.linear import linear_specs
from neva.params import ParamSpec, normal
from neva.parallel.plan import Layout
from neva.registry import ENCODERS, PROJECTORS, Encoder, Projector
from neva.testing import gather, local_world, max_rel_err, reference_grads, sharded_grads
from train_helpers import batch


# -- a projector an experiment might add: average-pool each 2x2 block of patches, then an MLP
def pool_specs(cfg: ModelConfig) -> dict:
    dv, dl = cfg.vision.dim, cfg.llm.dim
    return {"fc1": linear_specs(dl, dv, ("mlp", "embed"), bias=True),                  # column-parallel
            "fc2": linear_specs(dl, dl, ("embed", "mlp"), bias=True, bias_axis=None)}  # row-parallel


def pool_apply(p: dict, x_npd: torch.Tensor, cfg: ModelConfig, dist) -> torch.Tensor:
    n, t, d = x_npd.shape
    g = math.isqrt(t)
    x = F.avg_pool2d(x_npd.transpose(1, 2).reshape(n, d, g, g), 2).flatten(2).transpose(1, 2)
    h = F.gelu(F.linear(comm.copy_to_tp(x, dist), p["fc1"]["w"], p["fc1"]["b"]))   # this rank's slice of D_llm
    return comm.reduce_from_tp(F.linear(h, p["fc2"]["w"]), dist) + p["fc2"]["b"]


def pool_tokens(n: int, cfg: ModelConfig) -> int:
    return (math.isqrt(n) // 2) ** 2


# -- an encoder: patches through one linear layer (a stand-in for a new tower)
def patch_specs(cfg: VisionConfig) -> dict:
    return {"w": ParamSpec((cfg.dim, 3 * cfg.patch_size**2), ("embed", None), normal(0.02))}


def patch_apply(p: dict, images: torch.Tensor, cfg: VisionConfig, dist) -> torch.Tensor:
    x = F.unfold(images.to(p["w"].dtype), cfg.patch_size, stride=cfg.patch_size)     # [N, 3*p*p, grid^2]
    return F.linear(x.transpose(1, 2), p["w"])


@pytest.fixture(scope="module", autouse=True)
def registered():
    PROJECTORS.register("test_pool", Projector(pool_specs, pool_apply, pool_tokens), replace=True)
    ENCODERS.register("test_patches", Encoder(patch_specs, patch_apply, lambda v: v.grid**2), replace=True)


def _cfg(vision: str = "siglip") -> ModelConfig:
    return ModelConfig(vision=replace(tiny_vision(), kind=vision), projector=ProjectorConfig("test_pool"),
                       llm=tiny_llm("llama2", n_kv_heads=4), image_token_id=255)


def test_a_registered_projector_sets_tokens_per_image_and_trains():
    cfg = _cfg()
    assert cfg.tokens_per_image == 4                          # a 4x4 grid pooled 2x2
    p = model.init_params(cfg, 0)
    assert set(p["projector"]) == {"fc1", "fc2"}
    b = batch(cfg)
    loss, grads = model.loss(p, cfg, b), torch.func.grad(model.loss)(p, cfg, b)
    assert torch.isfinite(loss) and float(grads["projector"]["fc1"]["w"].abs().sum()) > 0
    assert float(grads["vision"]["layers"]["0"]["attn"]["wq"]["w"].abs().sum()) > 0


def test_a_registered_encoder_replaces_the_vit():
    cfg = _cfg(vision="test_patches")
    p = model.init_params(cfg, 0)
    assert set(p["vision"]) == {"w"} and cfg.vision.tokens_out == 16
    b = batch(cfg)
    assert torch.func.grad(model.loss)(p, cfg, b)["vision"]["w"].abs().sum() > 0


def test_a_registered_part_shards_like_the_built_in_ones():
    """tp=2: the new projector's linears are sharded by their logical axes and its collectives are
    the ones it calls; the step under the plan gives the single-process gradients."""
    cfg = _cfg()
    params, b = model.init_params(cfg, 1), batch(cfg)
    ref_stats, ref = reference_grads(params, cfg, b, 1)
    with local_world(cfg, Layout(tp=2)) as (par, mode):
        assert par.placements()["projector/fc1/w"] == ("tp", None)
        assert par.placements()["projector/fc2/w"] == (None, "tp")
        stats, grads = sharded_grads(par, params, cfg, b, mode=mode)
        full = gather(par, grads, mode)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    assert max_rel_err(ref, full) < 1e-4


def test_unknown_names_list_what_is_registered():
    with pytest.raises(ValueError, match=r"model.projector.kind='nope' is not a registered part; registered: .*mlp_downsample"):
        ModelConfig(projector=ProjectorConfig("nope")).validate()
    with pytest.raises(ValueError, match=r"model.vision.kind='convnext'.*clip, dino, fused, siglip"):
        model.specs(ModelConfig(vision=VisionConfig(kind="convnext")))
    with pytest.raises(ValueError, match="already registered"):
        PROJECTORS.register("linear", Projector(pool_specs, pool_apply))
