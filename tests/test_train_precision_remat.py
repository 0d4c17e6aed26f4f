"""Each precision trains the tiny model; O2 masters stay fp32; fp16 scaler and a forced overflow; remat
gives identical grads and recomputes exactly the layers its policy names."""
import pytest
import torch

from neva.params import flatten
from neva.testing.checks import layer_runs
from neva.train import optim
from neva.train import step as S
from neva.train import precision as P
from neva.train.precision import LossScaler
from neva.train.remat import RematPolicy
from train_helpers import batch, max_diff, params, tiny_cfg


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16_o2", "fp16"])
def test_each_precision_trains(precision):
    cfg = tiny_cfg()
    setup = S.StepSetup(cfg, optim.AdamW(lr=3e-3, warmup=0, total=30), precision=precision)
    st = S.init_state(params(cfg), setup)
    b = batch(cfg, B=4, T=40)
    losses = [S.train_step(st, [b], setup)["loss"] for _ in range(25)]
    assert losses[-1] < losses[0] - 1.0, losses
    dtypes = {v.dtype for v in flatten(st.params).values()}
    if precision == "bf16_o2":
        assert dtypes == {torch.bfloat16}
        assert {v.dtype for v in st.opt_state["master"].values()} == {torch.float32}
        assert {v.dtype for v in st.opt_state["m"].values()} == {torch.float32}
        p, m = flatten(st.params)["projector/fc1/w"], st.opt_state["master"]["projector/fc1/w"]
        assert torch.equal(p, m.to(torch.bfloat16)) and not torch.equal(p.float(), m)   # masters keep the low bits
    else:
        assert dtypes == {torch.float32} and "master" not in st.opt_state
    if precision == "fp16":
        assert st.scaler is not None and st.scaler.scale > 1


def test_auto_precision_is_bf16_only_where_bf16_is_native():
    """Decided from the same matmul timed in both dtypes: an AVX2-only CPU (bf16 75x slower) trains in
    fp32 and says why; a CPU with native bf16 trains in bf16; on this machine auto resolves to one of
    them and the policy is that one's."""
    assert P.choose("cpu", t_fp32=1.0, t_bf16=75.0)[0] == "fp32"
    assert "75x slower" in P.choose("cpu", t_fp32=1.0, t_bf16=75.0)[1]
    assert P.choose("cpu", t_fp32=1.0, t_bf16=0.3)[0] == "bf16"
    assert P.choose("cpu", t_fp32=1.0, t_bf16=1.05)[0] == "bf16"
    name, why = P.resolve("auto")
    assert name in ("fp32", "bf16") and why.startswith("auto: " + name)
    assert P.policy("auto") == P.policy(name)
    assert P.resolve("fp16") == ("fp16", "fp16")


def test_loss_scaler_halves_on_overflow_and_grows():
    s = LossScaler(scale=8.0, growth_interval=2)
    s.update(False)
    assert s.scale == 4.0
    s.update(True), s.update(True)
    assert s.scale == 8.0


def _flat_copy(tree):
    return {k: v.clone() for k, v in flatten(tree).items()}


def overflowing_scale(cfg, p, b, setup) -> float:
    """The smallest power of two whose fp16 step on ``b`` overflows (found by bisection on fresh states):
    a step at half of it is finite."""
    tr = optim.trainable_paths(p, setup.opt)

    def overflows(k):
        g, _ = S.compute_grads(p, cfg, [b], trainable=tr, pol=setup.pol, loss_scale=2.0 ** k)
        return not torch.isfinite(optim.global_norm(g))
    lo, hi = 0, 127                      # finite at 2^lo, overflow at 2^hi
    assert not overflows(lo) and overflows(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if overflows(mid) else (mid, hi)
    return 2.0 ** hi


def test_fp16_overflow_skips_the_step_halves_the_scale_and_the_next_step_trains():
    cfg = tiny_cfg()
    setup = S.StepSetup(cfg, optim.AdamW(lr=3e-3, warmup=0, total=10), precision="fp16")
    b = batch(cfg, B=4, T=40)
    scale = overflowing_scale(cfg, params(cfg), b, setup)
    st = S.init_state(params(cfg), setup)
    st.scaler.scale = scale
    before, moments = _flat_copy(st.params), {k: v.clone() for k, v in st.opt_state["m"].items()}
    row = S.train_step(st, [b], setup)
    assert row["skipped_now"] and row["loss_scale"] == scale / 2 and st.step == 0 and st.skipped == 0
    after = flatten(st.params)
    assert all(torch.equal(before[k], after[k]) for k in before)               # bit-identical
    assert all(torch.equal(moments[k], st.opt_state["m"][k]) for k in moments)
    row = S.train_step(st, [b], setup)
    assert not row["skipped_now"] and st.step == 1 and st.scaler.scale == scale / 2
    assert any(not torch.equal(before[k], v) for k, v in flatten(st.params).items())


@pytest.mark.parametrize("method,n,want", [("none", 1, [1, 1, 1]), ("uniform", 1, [2, 2, 2]), ("uniform", 2, [2, 2, 2]),
                                           ("block", 1, [2, 1, 1]), ("block", 2, [2, 2, 1])])
@pytest.mark.parametrize("mode", ["autograd", "func"])
def test_remat_recomputes_exactly_the_layers_it_names(method, n, want, mode):
    """Runs of each decoder layer in one forward + backward: once in the forward, and once more in the
    backward for every layer the policy checkpoints (uniform: all; block: the first n)."""
    cfg = tiny_cfg(layers=3)
    p, b = params(cfg), batch(cfg)
    with layer_runs() as runs:
        S.compute_grads(p, cfg, [b], trainable=optim.trainable_paths(p, optim.AdamW()), mode=mode,
                        remat=RematPolicy(method, n))
    assert [runs.get(i, 0) for i in range(cfg.llm.n_layers)] == want


@pytest.mark.parametrize("method,n", [("uniform", 1), ("uniform", 2), ("block", 2)])
@pytest.mark.parametrize("mode", ["autograd", "func"])
def test_remat_gives_identical_grads(method, n, mode):
    cfg = tiny_cfg(layers=3)
    p, b = params(cfg), batch(cfg)
    tr = optim.trainable_paths(p, optim.AdamW())
    g0, s0 = S.compute_grads(p, cfg, [b], trainable=tr, mode=mode)
    g1, s1 = S.compute_grads(p, cfg, [b], trainable=tr, mode=mode, remat=RematPolicy(method, n))
    assert s0["loss"] == s1["loss"]
    assert max_diff(g0, g1) == 0.0


def test_remat_recomputes_under_bf16_autocast(monkeypatch):
    from neva.train import precision
    monkeypatch.setattr(precision, "CPU_MATH_ATTENTION", False)   # remat keeps the flash kernel: compare like with like
    cfg = tiny_cfg(layers=2)
    p, b = params(cfg), batch(cfg)
    tr = optim.trainable_paths(p, optim.AdamW())
    pol = S.get_policy("bf16")
    g0, _ = S.compute_grads(p, cfg, [b], trainable=tr, pol=pol)
    g1, _ = S.compute_grads(p, cfg, [b], trainable=tr, pol=pol, remat=RematPolicy("uniform", 1))
    assert max_diff(g0, g1) == 0.0


def test_remat_policy_validates():
    with pytest.raises(ValueError, match="use one of"):
        RematPolicy("selective").validate()


def test_bf16_math_attention_kernel_is_as_close_to_fp32_as_flash(monkeypatch):
    from neva.train import precision
    cfg = tiny_cfg(layers=2)
    p, b = params(cfg), batch(cfg)
    tr = [k for k in optim.trainable_paths(p, optim.AdamW()) if not k.endswith("wk/b")]   # key bias: zero gradient
    g32, _ = S.compute_grads(p, cfg, [b], trainable=tr)
    g_math, _ = S.compute_grads(p, cfg, [b], trainable=tr, pol=S.get_policy("bf16"))
    monkeypatch.setattr(precision, "CPU_MATH_ATTENTION", False)
    g_flash, _ = S.compute_grads(p, cfg, [b], trainable=tr, pol=S.get_policy("bf16"))

    def err(g):
        return max(float((g[k] - g32[k]).norm() / g32[k].norm()) for k in tr if g32[k].norm() > 0)

    assert err(g_math) < 0.05 and err(g_math) < 2 * err(g_flash)
