"""The planner (``neva.planner``) against what a run holds and sends: parameter and optimizer bytes
equal those of a real step on gloo (ZeRO-1 and bf16_o2 masters included), collective payloads per
axis equal what ``neva.comm.counting`` recorded, activations are within 5% of the storages autograd
saved; and its Megatron accounting (``ideal``) lands within 10% of Korthikanti et al. 2022."""
from dataclasses import replace

import pytest
import torch

from neva import model, planner
from neva.config import ModelConfig, llama2_7b, tiny_llm, tiny_vision
from neva.params import flatten, unflatten
from neva.parallel.plan import Layout, Plan
from neva.testing.footprint import saved_bytes, step_footprint


def _cfg(kind: str) -> ModelConfig:
    return ModelConfig(vision=tiny_vision("siglip", image_size=16, dim=32, n_heads=4, mlp_dim=64, n_layers=2),
                       llm=tiny_llm(kind, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, n_layers=4),
                       image_token_id=63)


def _batch(cfg: ModelConfig, B: int = 4, T: int = 30) -> dict:
    """One image per row; the first 5 positions untrained."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (B, T), generator=g)
    ids[:, 2:2 + cfg.tokens_per_image] = 63
    labels = ids.masked_fill(ids == 63, -100)
    labels[:, :5] = -100
    return dict(input_ids=ids, labels=labels, pixel_values=torch.randn(B, 3, 16, 16, generator=g))


@pytest.mark.parametrize("kind,layout,vision,n_micro,zero1,precision", [
    ("llama3", Layout(tp=2, cp=2, sp=True), "tp", 1, False, "fp32"),
    ("llama3", Layout(cp=2, pp=2), "tp", 2, False, "fp32"),
    ("llama3", Layout(tp=2, dp=2), "tp", 1, True, "fp32"),
    ("llama3", Layout(cp=2, tp=2), "frames", 1, False, "bf16_o2"),
    ("mixtral", Layout(ep=2, tp=2, sp=True), "tp", 1, False, "fp32")], ids=str)
def test_planner_equals_a_real_step(gloo_pool, kind, layout, vision, n_micro, zero1, precision):
    cfg, plan = _cfg(kind), Plan(layout, towers=Plan.vision_rows(vision))
    batch = _batch(cfg)
    got = gloo_pool.run(step_footprint, cfg, layout, model.init_params(cfg), batch, n_micro, precision, zero1, vision)
    w = planner.Workload(seq=batch["input_ids"].shape[1], micro_batch=4 // (layout.dp * layout.ep) // n_micro,
                         micro_batches=n_micro, media=1, precision=precision, zero1=zero1)
    for rank, g in enumerate(got):
        st = planner.state_bytes(cfg, plan, rank, w)
        assert (g["params"], g["optimizer"]) == (st["params"], st["optimizer_zero1" if zero1 else "optimizer"]), rank
        want = planner.collectives(cfg, plan, rank, w, label_rows=g["label_rows"])
        if cfg.llm.n_experts and layout.ep > 1:     # the routed rows depend on the router: a balanced one
            sent, pred = g["sent"].pop(("ep", "all_to_all")), want.pop(("ep", "all_to_all"))
            assert abs(sent - pred) < 0.05 * pred
        assert g["sent"] == dict(want), rank
        if "activations" in g:                      # an ep rank runs the rows its router sent it: 10%
            pred = planner.activations(cfg, plan, rank, w, label_rows=g["label_rows"][0])["per_micro_batch"]
            tol = 0.10 if layout.ep > 1 else 0.05
            assert abs(pred - g["activations"]) < tol * g["activations"], (rank, pred, g["activations"])


@pytest.mark.parametrize("kind", ["llama3", "mixtral", "nemotron"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_o2"])
def test_activation_bytes_match_what_autograd_saves(kind, precision):
    """One process: the activation count against the storages autograd keeps for the backward."""
    cfg = replace(_cfg(kind), llm=replace(_cfg(kind).llm, dim=64, ffn_dim=128, n_layers=2))
    dtype = torch.bfloat16 if precision == "bf16_o2" else torch.float32
    leaves = {p: v.to(dtype).requires_grad_() for p, v in flatten(model.init_params(cfg)).items()}
    batch = _batch(cfg, B=2, T=64)
    got = saved_bytes(lambda: model.loss_terms(unflatten(leaves), cfg, batch),
                      {v.untyped_storage().data_ptr() for v in leaves.values()})
    rows = int((batch["labels"][:, 1:] != -100).sum())
    pred = planner.activations(cfg, Plan(Layout()), 0, planner.Workload(seq=64, micro_batch=2, precision=precision),
                               label_rows=rows)["per_micro_batch"]
    assert abs(pred - got) < 0.05 * got, (pred, got)


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2, sp=True), Layout(tp=8, sp=True)], ids=str)
def test_megatron_accounting_is_korthikanti_within_10_percent(layout):
    """Llama-2-7B (dense, MHA, SwiGLU 2.7h), s = 4096: one layer with selective recomputation (no
    attention scores kept) is 34 sbh / t bytes in Korthikanti et al.'s Table 2; our count of what
    Megatron keeps lands within 10%. What this code keeps is more (reported, not asserted equal)."""
    cfg = ModelConfig(llm=llama2_7b())
    plan, w = Plan(layout), planner.Workload(seq=4096, micro_batch=1, precision="bf16_o2")
    want = planner.korthikanti(cfg, plan, w, selective=True)
    ideal = sum(planner._llm_layer(cfg, plan, w, ideal=True).values())
    ours = sum(planner._llm_layer(cfg, plan, w, ideal=False).values())
    assert abs(ideal - want) < 0.10 * want, (ideal, want)
    assert ours >= ideal
