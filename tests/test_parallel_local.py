"""Sharding equivalence, fast tier: a simulated world of 1-4 ranks in this process (LocalTensorMode).
Random small configs and random plans that fit them (tp, sp, ep, dp): the sharded step's loss and
every parameter's gradient, unsharded, equal the single-process function's (fp32)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from neva import model
from neva.parallel import comm
from neva.parallel.comm import Dist
from neva.parallel.plan import Layout, Plan
from neva.parallel.testing import local_world, max_rel_err, reference_step, sharded_step
from parallel_cases import cases

RTOL = 1e-4


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_world=4))
def test_sharded_step_equals_single_process(case):
    cfg, batch, lay = case.cfg, case.batch(), case.layout
    params = model.init_params(cfg, case.batch_seed)
    ce_ref, aux_ref, g_ref = reference_step(params, cfg, batch, lay.dp * lay.ep)
    with local_world(Plan(lay), model.specs(cfg)) as world:
        ce, aux, grads = sharded_step(world, params, cfg, batch)
    assert ce == pytest.approx(ce_ref, rel=RTOL, abs=1e-6)
    assert aux == pytest.approx(aux_ref, rel=RTOL, abs=1e-6)
    assert max_rel_err(g_ref, grads) < RTOL


def _plan(tp):
    return Plan(Layout(tp=tp))


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_forward_and_backward(tp):
    """Each collective against its definition, values and gradients, in a simulated world."""
    with local_world(_plan(tp), {}) as w:
        d: Dist = w.dist
        x = w.per_rank(lambda r: torch.arange(8.0).reshape(1, 8, 1) * (r + 1))   # rank r holds (r+1)*x
        full = torch.arange(8.0).reshape(1, 8, 1)
        s = sum(range(1, tp + 1))

        def grad_of(fn, inp):
            inp = inp.detach().requires_grad_()
            out = fn(inp)
            (out * w.per_rank(lambda r: torch.full_like(w.value(out, r), r + 1.0))).sum().backward()
            return out, inp.grad

        out, g = grad_of(lambda t: comm.reduce_from_tp(t, d), x)        # all-reduce / identity
        assert torch.equal(w.value(out, 0), full * s) and torch.equal(w.value(g, 1), torch.full_like(full, 2.0))
        out, g = grad_of(lambda t: comm.copy_to_tp(t, d), x)            # identity / all-reduce
        assert torch.equal(w.value(out, 1), full * 2) and torch.equal(w.value(g, 0), torch.full_like(full, s))
        out, g = grad_of(lambda t: comm.scatter_seq(t, d), x)           # split / all-gather
        assert torch.equal(w.value(out, 1), (full * 2)[:, 8 // tp:2 * 8 // tp])
        assert torch.equal(w.value(g, 0), torch.cat([torch.full((1, 8 // tp, 1), r + 1.0) for r in range(tp)], 1))
        out, g = grad_of(lambda t: comm.gather_seq(comm.scatter_seq(t, d), d), x)   # round trip
        assert torch.equal(w.value(out, 0), torch.cat([(full * (r + 1))[:, r * 8 // tp:(r + 1) * 8 // tp]
                                                       for r in range(tp)], 1))
        out, g = grad_of(lambda t: comm.reduce_scatter_seq(t, d), x)    # reduce-scatter / all-gather
        assert torch.equal(w.value(out, 1), (full * s)[:, 8 // tp:2 * 8 // tp])


def test_collectives_are_identity_without_a_group():
    x = torch.randn(2, 4, 3, requires_grad=True)
    d = Dist()
    for fn in (comm.copy_to_tp, comm.reduce_from_tp, comm.gather_seq, comm.scatter_seq, comm.enter_tp, comm.exit_tp):
        assert fn(x, d) is x
    assert comm.all_to_all(x, [2], [2], None) is x


def test_vmap_rule_of_tp_collectives():
    """Per-example gradients (vmap over grad) through copy_to_tp / reduce_from_tp in a tp=2 world."""
    with local_world(_plan(2), {}) as w:
        d = w.dist
        wgt = w.per_rank(lambda r: torch.full((3,), r + 1.0))
        xs = torch.randn(5, 3)

        def f(wt, x):
            return comm.reduce_from_tp(comm.copy_to_tp(x, d) * wt, d).sum()
        per_ex = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(wgt, xs)
        assert torch.allclose(w.value(per_ex, 1), xs)
