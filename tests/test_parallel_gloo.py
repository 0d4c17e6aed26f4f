"""Sharding equivalence, real tier: four gloo processes kept alive for the session. Random configs
and random plans that fill the world (tp, sp, ep, pp, dp), including pipelines (1F1B, GPipe) and
torch.func gradients through the collectives: the real training step's statistics and every gradient
equal the same step's in one process over the same micro-batches."""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neva import model
from neva.config import ModelConfig, ProjectorConfig, tiny_llm, tiny_vision
from neva.params import flatten
from neva.parallel.plan import Layout
from neva.testing import check_step, max_rel_err
from neva.testing.checks import all_to_all_vmap_check, gather_kv_vmap_check, same_stats
from neva.testing.runs import train_losses
from parallel_cases import EXPLICIT, cases

RTOL = 1e-4


def _check(res):
    assert not same_stats(res["stats"], res["stats_ref"], RTOL)
    assert res["grad_err"] < RTOL


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases(max_world=4, pp=True, fill=True), data=st.data())
def test_sharded_step_equals_single_process(gloo_pool, case, data):
    lay = case.layout
    grad_mode = "autograd" if lay.pp > 1 else data.draw(st.sampled_from(["autograd", "func"]), label="grad_mode")
    schedule = data.draw(st.sampled_from(["1f1b", "gpipe"]), label="schedule")
    params = model.init_params(case.cfg, case.batch_seed)
    res = gloo_pool.run(check_step, case.cfg, lay, params, case.batch(), case.n_micro, schedule, grad_mode)[0]
    _check(res)


@pytest.mark.parametrize("name", list(EXPLICIT))
def test_hard_cases(gloo_pool, name):
    """parallel_cases.EXPLICIT on real processes, with torch.func gradients through the collectives."""
    case = EXPLICIT[name]
    params = model.init_params(case.cfg, case.batch_seed)
    _check(gloo_pool.run(check_step, case.cfg, case.layout, params, case.batch(), case.n_micro, "1f1b", "func")[0])


def _main_like_cfg():
    return ModelConfig(vision=tiny_vision("siglip", image_size=16, dim=32, n_heads=4, mlp_dim=64, n_layers=2),
                       llm=tiny_llm("mixtral", dim=32, n_heads=4, n_kv_heads=4, ffn_dim=64, vocab_size=64,
                                    n_layers=4, n_experts=4, z_loss_coef=1e-3), image_token_id=63)


def _batch(B=8, T=16, seed=0):
    """Rows with 0-2 images; batch ``seed`` draws the tokens. Labels uneven over rows: row r keeps
    about (r + 1) / (B + 1) of its text labels, so every data shard trains on a different count."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (B, T), generator=g)
    ids[0, 2:6] = 63
    ids[2, 3:7] = 63
    ids[5, 1:5] = 63
    ids[5, 8:12] = 63
    labels = ids.masked_fill(ids == 63, -100)
    keep = torch.rand(B, T, generator=g) < (torch.arange(1, B + 1) / (B + 1))[:, None]
    labels = labels.masked_fill(~keep, -100)
    labels[:, -2] = ids[:, -2]                       # at least one label per row
    return dict(input_ids=ids, pixel_values=torch.randn(4, 3, 16, 16, generator=g), labels=labels)


@pytest.mark.parametrize("layout,grad_mode,n_micro,schedule", [
    (Layout(tp=2, pp=2), "autograd", 2, "1f1b"),
    (Layout(tp=2, pp=2, sp=True), "autograd", 4, "gpipe"),
    (Layout(pp=4), "autograd", 2, "1f1b"),
    (Layout(pp=2, dp=2), "autograd", 2, "1f1b"),
    (Layout(tp=2, ep=2, sp=True), "autograd", 1, "1f1b"),
    (Layout(tp=2, ep=2, sp=True), "autograd", 2, "1f1b"),
    (Layout(tp=2, dp=2), "func", 1, "1f1b"),
    (Layout(ep=2, pp=2), "autograd", 2, "gpipe"),
], ids=lambda v: str(v))
def test_named_layouts(gloo_pool, layout, grad_mode, n_micro, schedule):
    cfg = _main_like_cfg()
    res = gloo_pool.run(check_step, cfg, layout, model.init_params(cfg, 1), _batch(), n_micro, schedule, grad_mode)[0]
    _check(res)


STEP_LAYOUTS = [(Layout(tp=2, pp=2), 2), (Layout(tp=2, ep=2, sp=True), 1), (Layout(tp=2, dp=2), 1), (Layout(pp=4), 2),
                (Layout(pp=2, dp=2), 2)]


@pytest.mark.parametrize("layout,grad_accum", STEP_LAYOUTS, ids=lambda v: str(v))
def test_training_steps_match_single_process(gloo_pool, layout, grad_accum):
    """The real training step (AdamW, clipping by the global norm, accumulation) under a plan, 5 steps
    on distinct batches whose data shards hold uneven label counts, with a clip that acts on every step:
    the per-step losses and gradient norms equal the single-process run's, the final params agree to
    1e-4, and every replicated copy of a gradient and a param is bitwise the same on every rank that
    holds it. The attention key biases stay frozen: their gradient is zero by construction (softmax
    ignores a shift), so Adam would turn rounding noise into full-size steps of either sign."""
    cfg = _main_like_cfg()
    params = model.init_params(cfg, 1)
    batches = [_batch(seed=s) for s in range(5)]
    kw = dict(grad_accum=grad_accum, lr=1e-3, clip=0.05, freeze=r"attn/wk/b$")
    ref = train_losses(None, layout, cfg, params, batches, **kw)
    got = gloo_pool.run(functools.partial(train_losses, **kw, replicas=True), layout, cfg, params, batches)[0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert min(ref["grad_norms"]) > 2 * kw["clip"]                         # the clip scaled every step
    assert len(set(ref["losses"])) == 5
    assert max_rel_err(ref["params"], got["params"]) < 1e-4
    copies, bad = got["replicas"]
    assert not bad, bad[:5]
    assert copies > 0 or layout == Layout(pp=4)                              # pp4 replicates nothing


@pytest.mark.parametrize("layout", [Layout(tp=2, pp=2), Layout(tp=2, dp=2, sp=True)], ids=str)
def test_lora_under_a_plan_matches_single_process(gloo_pool, layout):
    """LoRA factors follow their weight's sharding (a by its input dim, b by its output dim); a factor
    replicated over tp multiplies a tp-sharded slice, so its gradient is summed over tp."""
    cfg = _main_like_cfg()
    params = model.init_params(cfg, 3)
    batches = [_batch() for _ in range(2)]
    ref = train_losses(None, layout, cfg, params, batches, 2 // (layout.dp * layout.ep), lora="all")
    got = gloo_pool.run(train_losses, layout, cfg, params, batches, 2 // (layout.dp * layout.ep), 1e-3, 1.0,
                        "fp32", "all")[0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert max_rel_err(ref["params"], got["params"]) < 2e-3


@pytest.mark.parametrize("precision", ["bf16_o2", "fp16"])
def test_mixed_precision_under_a_plan(gloo_pool, precision):
    """bf16 params with fp32 masters, and fp16 with loss scaling, train under tp2 x pp2 like one
    process does (bf16 rounding differs with the reduction order: loose tolerance)."""
    cfg = _main_like_cfg()
    params = model.init_params(cfg, 4)
    batches = [_batch() for _ in range(3)]
    lay = Layout(tp=2, pp=2)
    ref = train_losses(None, lay, cfg, params, batches, 2, 1e-3, 1.0, precision)
    got = gloo_pool.run(train_losses, lay, cfg, params, batches, 2, 1e-3, 1.0, precision)[0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=2e-2)
    assert got["losses"][-1] < got["losses"][0]
    assert {v.dtype for v in flatten(got["params"]).values()} == {
        torch.bfloat16 if precision == "bf16_o2" else torch.float32}


@pytest.mark.parametrize("layout,precision", [(Layout(dp=4), "fp32"), (Layout(dp=2, tp=2), "bf16_o2"),
                                              (Layout(dp=2, pp=2), "fp32")], ids=str)
def test_zero1_splits_optimizer_state_and_trains_the_same(gloo_pool, layout, precision):
    """ZeRO-1: each dp rank keeps the moments (and fp32 masters) of a disjoint share of the leaves,
    updates those and broadcasts them; the losses and final params are those of the run without it."""
    cfg = _main_like_cfg()
    params = model.init_params(cfg, 5)
    batches = [_batch() for _ in range(3)]
    ref = gloo_pool.run(train_losses, layout, cfg, params, batches, 1, 1e-3, 1.0, precision)[0]
    got = gloo_pool.run(train_losses, layout, cfg, params, batches, 1, 1e-3, 1.0, precision, "", True)
    assert got[0]["losses"] == pytest.approx(ref["losses"], rel=1e-6 if precision == "fp32" else 1e-3)
    assert max_rel_err(ref["params"], got[0]["params"]) < (1e-6 if precision == "fp32" else 1e-2)
    # every rank with the same (pp, tp, ep) coordinates: the dp ranks split its leaves, each exactly once
    groups: dict = {}
    for r, res in enumerate(got):
        c = layout.coords(r)
        groups.setdefault((c["pp"], c["tp"], c["ep"]), []).append(res)
    for members in groups.values():
        leaves = [set(m["opt_leaves"]) for m in members]
        assert len(members) == layout.dp and all(leaves)
        assert sum(len(s) for s in leaves) == len(set().union(*leaves))          # disjoint
        sizes = [m["opt_numel"] for m in members]
        assert max(sizes) < 0.75 * sum(sizes)                                   # balanced, not all on one


@pytest.mark.parametrize("overflow_stage", [0, 1])
def test_fp16_overflow_in_one_stage_skips_the_step_on_every_rank(gloo_pool, overflow_stage):
    """fp16 under tp2 x pp2 where only one pipeline stage's gradients overflow: every rank skips the
    step (params bit-identical), every rank halves its loss scale, and the next steps train, with the
    losses of a single process whose first step was skipped the same way."""
    from neva.testing.runs import fp16_overflow
    cfg = _main_like_cfg()
    params = model.init_params(cfg, 6)
    batches = [_batch(seed=s) for s in range(3)]
    res = gloo_pool.run(fp16_overflow, Layout(tp=2, pp=2), cfg, params, batches, 2, overflow_stage)
    assert sorted(r["stage"] for r in res) == [0, 0, 1, 1]
    for r in res:
        first, rest = r["rows"][0], r["rows"][1:]
        assert first["skipped_now"] and r["kept"] and first["loss_scale"] == 2.0 ** 15 and first["step"] == 0
        assert not any(x["skipped_now"] for x in rest) and r["moved"] and rest[-1]["step"] == 2
        assert all(x["loss_scale"] == 2.0 ** 15 for x in rest)
    ref = train_losses(None, Layout(tp=2, pp=2), cfg, params, batches[1:], 2, 1e-3, 1.0, "fp16")
    assert [x["loss"] for x in res[0]["rows"][1:]] == pytest.approx(ref["losses"], rel=2e-2)


@pytest.mark.parametrize("method,n", [("uniform", 1), ("block", 1)])
def test_remat_under_tp2_pp2(gloo_pool, method, n):
    """Activation checkpointing inside the pipeline schedule: the gradients equal one process's without
    remat, and each rank recomputes exactly the layers of its stage that the policy names (uniform:
    all, block 1: the stage's first), once per micro-batch."""
    from neva.train.remat import RematPolicy
    cfg = _main_like_cfg()
    lay, n_micro = Layout(tp=2, pp=2), 2
    res = gloo_pool.run(check_step, cfg, lay, model.init_params(cfg, 1), _batch(), n_micro, "1f1b", "autograd", "tp",
                        RematPolicy(method, n))[0]
    _check(res)
    from neva.parallel.plan import Plan
    stages = Plan(lay).stages(cfg)
    for r, runs in enumerate(res["layer_runs"]):
        stage = list(stages[lay.coords(r)["pp"]])
        assert sorted(runs) == stage
        want = {i: n_micro * (2 if (method == "uniform" or i == stage[0]) else 1) for i in stage}
        assert runs == want, (r, runs, want)


def test_vmap_rule_of_all_to_all(gloo_pool):
    """Per-example all-to-all (vmap, and vmap of grad) on 4 gloo ranks equals a loop over examples."""
    assert max(gloo_pool.run(all_to_all_vmap_check)) < 1e-6


# ------------------------------------------------------------------------- context parallelism
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases(max_world=4, pp=True, fill=True, cp=True), data=st.data())
def test_context_parallel_step_equals_single_process(gloo_pool, case, data):
    """cp with tp / sp / ep / pp / dp on real processes, torch.func gradients through the K/V
    exchange included, an image across a chunk boundary, each vision tower layout."""
    lay = case.layout
    grad_mode = "autograd" if lay.pp > 1 else data.draw(st.sampled_from(["autograd", "func"]), label="grad_mode")
    n_micro = data.draw(st.sampled_from([m for m in (1, 2) if case.rows_per_shard % m == 0]), label="n_micro")
    params = model.init_params(case.cfg, case.batch_seed)
    _check(gloo_pool.run(check_step, case.cfg, lay, params, case.batch(), n_micro, "1f1b", grad_mode, case.vision)[0])


def _long_video_cfg():
    """The long-video experiment's shape in small: 16-token frames pooled 2x2 to 4, many per sample."""
    return ModelConfig(vision=tiny_vision("siglip", image_size=16, patch_size=4, dim=32, n_heads=4, mlp_dim=64, n_layers=2),
                       projector=ProjectorConfig("mlp2x_gelu", frame_pool=2),
                       llm=tiny_llm("mixtral", dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                                    n_layers=4, n_experts=4, z_loss_coef=1e-3), image_token_id=63)


def _long_video_batch(B=2, frames=12, T=72):
    """Each row: a video of ``frames`` pooled frames (4 tokens each) from position 3, then a
    question; row 1 also has an image (16 tokens), so images and frames mix in one batch."""
    cfg, g = _long_video_cfg(), torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (B, T), generator=g)
    ids[:, 3:3 + 4 * frames] = 63
    ids[1, 3 + 4 * frames + 1:3 + 4 * frames + 17] = 63
    flags = torch.tensor([True] * frames + [True] * frames + [False])
    labels = ids.masked_fill(ids == 63, -100)
    labels[:, :3 + 4 * frames] = -100
    return dict(input_ids=ids, labels=labels, video_frames=flags,
                pixel_values=torch.randn(len(flags), 3, cfg.vision.image_size, cfg.vision.image_size, generator=g))


@pytest.mark.parametrize("layout,vision,n_micro", [
    (Layout(cp=2, dp=2), "tp", 1), (Layout(cp=2, tp=2), "tp", 2), (Layout(cp=2, pp=2), "tp", 2),
    (Layout(cp=2, tp=2, sp=True), "frames", 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("which", ["main", "long_video"])
def test_named_cp_layouts(gloo_pool, layout, vision, n_micro, which):
    """cp2, cp2 x tp2 and cp2 x pp2 on the main job's model and on a long-video config (pooled
    frames, a frame-parallel vision tower)."""
    cfg, batch = (_main_like_cfg(), _batch()) if which == "main" else (_long_video_cfg(), _long_video_batch())
    if which == "long_video" and layout.dp > 1:
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    res = gloo_pool.run(check_step, cfg, layout, model.init_params(cfg, 1), batch, n_micro, "1f1b", "autograd", vision)[0]
    _check(res)


def test_vmap_rule_of_gather_kv(gloo_pool):
    """Per-example K/V exchange (vmap, and vmap of grad) on 4 cp ranks equals a loop over examples."""
    assert max(gloo_pool.run(gather_kv_vmap_check)) < 1e-6


@pytest.mark.parametrize("layout", [Layout(cp=2, tp=2), Layout(cp=2, dp=2)], ids=str)
def test_cp_training_steps_match_single_process(gloo_pool, layout):
    """The real training step under cp (AdamW, clipping by the global norm): losses, gradient norms
    and final params equal the single-process run's."""
    cfg = _main_like_cfg()
    params = model.init_params(cfg, 1)
    batches = [_batch() for _ in range(3)]
    ref = train_losses(None, layout, cfg, params, batches, 1)
    got = gloo_pool.run(train_losses, layout, cfg, params, batches, 1)[0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert max_rel_err(ref["params"], got["params"]) < 2e-3
