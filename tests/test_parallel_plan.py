"""The parallel plan as data: placements, validation messages, shard/unshard, stages, schedules,
and golden files of the resolved placements for the shipped presets (NEVA_UPDATE_GOLDEN=1 rewrites)."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from neva import model
from neva.config import (ModelConfig, ProjectorConfig, clip_vit_l14_336, llama2_7b, mixtral_8x7b, nemotron4_15b,
                         siglip_so400m_384, tiny_llm, tiny_vision)
from neva.params import flatten
from neva.parallel.pipeline import schedule_order
from neva.parallel.plan import Layout, Plan, stage_layers

GOLDEN = Path(__file__).parent / "golden"

PRESETS = {
    "siglip_mixtral": ModelConfig(vision=siglip_so400m_384(), llm=replace(mixtral_8x7b(), vocab_size=32064)),
    "clip_llama2": ModelConfig(vision=clip_vit_l14_336(), llm=replace(llama2_7b(), vocab_size=32064)),
    "siglip_nemotron": ModelConfig(vision=siglip_so400m_384(), projector=ProjectorConfig("mlp_downsample"),
                                   llm=nemotron4_15b(), image_token_id=255999),
}
LAYOUTS = {"siglip_mixtral": [Layout(tp=4, pp=2, ep=2, sp=True), Layout(tp=8, sp=True), Layout(tp=4, cp=4, sp=True)],
           "clip_llama2": [Layout(tp=2, pp=2, dp=2)],
           "siglip_nemotron": [Layout(tp=8, pp=4, sp=True)]}


def tiny_cfg(**llm_kw):
    return ModelConfig(vision=tiny_vision("siglip", image_size=16, dim=32, n_heads=4, mlp_dim=64, n_layers=2),
                       llm=tiny_llm("mixtral", dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                                    n_layers=4, **llm_kw), image_token_id=63)


@pytest.mark.parametrize("name,layout", [(n, l) for n, ls in LAYOUTS.items() for l in ls], ids=str)
def test_golden_placements(name, layout):
    cfg = PRESETS[name]
    plan = Plan(layout, towers=Plan.vision_rows("frames" if layout.cp > 1 else "tp"))
    specs = model.specs(cfg)
    plan.validate(cfg, specs)
    text = plan.describe(cfg, specs)
    path = GOLDEN / f"plan_{name}_{layout}.txt"
    if os.environ.get("NEVA_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing: create it with NEVA_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"placements changed for {name} {layout}: review, then NEVA_UPDATE_GOLDEN=1"


def test_rules_and_overrides():
    cfg = tiny_cfg()
    specs = model.specs(cfg)
    plan = Plan(Layout(tp=2, ep=2), overrides=((r"^vision/", "replicate"), (r"lm_head", (None, None))))
    pl = plan.placements(specs)
    assert pl["llm/layers/0/attn/wq/w"] == ("tp", None)
    assert pl["llm/layers/0/attn/wo/w"] == (None, "tp")
    assert pl["llm/layers/1/mlp/w2"] == ("ep", None, "tp")
    assert pl["llm/layers/1/mlp/router"] == (None, None)
    assert pl["vision/layers/0/attn/wq/w"] == (None, None)        # first match wins
    assert pl["llm/lm_head/w"] == (None, None)
    assert plan.replicated_parts(specs) == {"vision"}
    assert Plan(Layout(tp=1, ep=2)).placements(specs)["llm/layers/0/attn/wq/w"] == (None, None)  # size-1 axis


@pytest.mark.parametrize("layout,cfg_kw,needle", [
    (Layout(tp=4), {}, "n_kv_heads=2 does not divide by tp=4"),
    (Layout(ep=3, dp=1), {}, "n_experts=4 is not divisible by parallel.ep=3"),
    (Layout(pp=8), {}, "more stages than the 4 LLM layers"),
    (Layout(pp=2), {"tie_embeddings": True}, "tied embeddings with parallel.pp>1"),
    (Layout(sp=True), {}, "parallel.sp=true needs parallel.tp > 1"),
])
def test_validation_names_the_problem_and_suggests(layout, cfg_kw, needle):
    cfg = tiny_cfg(**cfg_kw)
    with pytest.raises(ValueError) as e:
        Plan(layout).validate(cfg, model.specs(cfg), world=4)
    assert needle in str(e.value)
    assert "layouts that fit 4 processes" in str(e.value)


def test_partial_replication_of_a_part_is_rejected():
    cfg = tiny_cfg()
    plan = Plan(Layout(tp=2), overrides=((r"^vision/layers/0/mlp", "replicate"),))
    with pytest.raises(ValueError, match="replicate some but not all"):
        plan.validate(cfg, model.specs(cfg))


def test_world_size_mismatch():
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*ep"):
        Layout.fit(6, tp=4)
    assert Layout.fit(8, tp=2, pp=2) == Layout(tp=2, pp=2, dp=2)


def test_shard_unshard_roundtrip_and_stage_drop():
    cfg = tiny_cfg()
    specs = model.specs(cfg)
    params = model.init_params(cfg, 3)
    plan = Plan(Layout(tp=2, pp=2, ep=2))
    plan.validate(cfg, specs)
    locals_ = [plan.shard(params, specs, cfg, r) for r in range(plan.layout.world)]
    # rank 0 is stage 0: vision and the first layers, no lm_head; sliced by tp and ep
    f0 = flatten(locals_[0])
    assert "vision/pos" in f0 and "llm/lm_head/w" not in f0 and "llm/layers/3/attn/wq/w" not in f0
    assert f0["llm/layers/0/mlp/w1"].shape == (2, 32, 32)            # [E/ep, F/tp, D]
    last = flatten(locals_[-1])
    assert "llm/lm_head/w" in last and "vision/pos" not in last
    back = flatten(plan.unshard(locals_, specs))
    for p, t in flatten(params).items():
        assert torch.equal(back[p], t), p


def test_sharded_init_equals_slice_of_full_init():
    """Per-path init: a rank can init its leaves and slice them; the slices tile the full tensor."""
    cfg = tiny_cfg()
    specs = model.specs(cfg)
    full = model.init_params(cfg, 7)
    plan = Plan(Layout(tp=2))
    again = plan.unshard([plan.shard(model.init_params(cfg, 7), specs, cfg, r) for r in range(2)], specs)
    assert all(torch.equal(a, b) for a, b in zip(flatten(full).values(), flatten(again).values()))


def test_stage_layers_balance():
    assert [len(r) for r in stage_layers(8, 2)] == [4, 4]
    assert [len(r) for r in stage_layers(8, 2, first_cost=2.0)] == [3, 5]
    rs = stage_layers(10, 3, last_cost=1.0)
    assert sum(len(r) for r in rs) == 10 and rs[0].start == 0 and rs[-1].stop == 10
    with pytest.raises(ValueError, match="at least 5 layers"):
        stage_layers(4, 5)


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
@pytest.mark.parametrize("n_micro,n_stages", [(1, 2), (4, 2), (3, 4), (8, 4)])
def test_schedules_run_every_micro_batch_once_in_order(kind, n_micro, n_stages):
    for s in range(n_stages):
        order = schedule_order(kind, n_micro, s, n_stages)
        fw = [m for k, m in order if k == "F"]
        bw = [m for k, m in order if k == "B"]
        assert fw == list(range(n_micro)) and bw == list(range(n_micro))
        for m in range(n_micro):                     # a micro-batch's backward follows its forward
            assert order.index(("F", m)) < order.index(("B", m))
        if kind == "1f1b":                           # at most pp - s micro-batches in flight
            live = peak = 0
            for k, _ in order:
                live += 1 if k == "F" else -1
                peak = max(peak, live)
            assert peak <= min(n_stages - s, n_micro)


def test_summary_mentions_every_axis():
    cfg = tiny_cfg()
    text = Plan(Layout(tp=2, pp=2, ep=2, dp=1, sp=True)).summary(cfg, model.specs(cfg))
    for needle in ["stage 0", "stage 1", "all-gather(seq)", "all-to-all", "send/recv", "MiB per rank"]:
        assert needle in text


def test_cp_layouts_and_tower_rows():
    """cp is a mesh axis between ep and tp; every leaf's gradient sums over it; a tower's layout
    replicates (or frame-shares) the encoder and projector, whose gradients then sum over tp."""
    cfg = tiny_cfg()
    specs = model.specs(cfg)
    lay = Layout.fit(16, tp=2, cp=2, ep=2)
    assert (lay.dp, str(lay)) == (2, "dp2xep2xcp2xtp2")
    assert lay.coords(lay.rank({"dp": 1, "cp": 1, "tp": 1})) == {"pp": 0, "dp": 1, "ep": 0, "cp": 1, "tp": 1}
    assert lay.rank({"cp": 1}) == 2                                  # tp fastest, then cp
    frames = Plan(lay, towers=Plan.vision_rows("frames"))
    pl, sums = frames.placements(specs), frames.grad_sums(specs)
    assert pl["vision/layers/0/attn/wq/w"] == (None, None) and pl["llm/layers/0/attn/wq/w"] == ("tp", None)
    assert sums["vision/layers/0/attn/wq/w"] == ("data", "cp", "tp")   # each rank encoded a share
    assert sums["llm/layers/0/attn/wq/w"] == ("data", "cp")
    assert sums["llm/layers/0/mlp/w1"] == ("dp", "cp")
    rep = Plan(lay, towers=Plan.vision_rows("replicate")).grad_sums(specs)
    assert rep["vision/layers/0/attn/wq/w"] == ("data", "cp")           # replicated: every rank saw every frame
    assert frames.frame_parts(specs) == {"vision", "projector"}
    with pytest.raises(ValueError, match="parallel.vision='pixels'"):
        Plan.vision_rows("pixels")
    with pytest.raises(ValueError, match="frame-parallel projector needs a frame-parallel vision"):
        Plan(lay, towers=((r"^projector/", "frames"),)).validate(cfg, specs)
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*ep\\*cp"):
        Layout.fit(6, tp=2, cp=2)
