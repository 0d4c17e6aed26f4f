"""Sharding equivalence, fast tier: a simulated world of 2-4 ranks in this process (LocalTensorMode).
Random small configs and random plans that fit them (tp, sp, ep, dp), one or two micro-batches per
data rank, and the explicit hard cases of ``parallel_cases.EXPLICIT``: the real training step's
statistics and every parameter's gradient, unsharded, equal the same step's in one process over the
same micro-batches (fp32)."""
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neva import comm, model
from neva.comm import Dist
from neva.config import ModelConfig, tiny_llm, tiny_vision
from neva.parallel.plan import Layout
from neva.testing import gather, local_world, max_rel_err, reference_grads, sharded_grads, value_on
from neva.testing.checks import same_stats
from parallel_cases import EXPLICIT, cases

RTOL = 1e-4


def _check_case(case):
    cfg, batch, lay, n_micro = case.cfg, case.batch(), case.layout, case.n_micro
    assert lay.world > 1
    params = model.init_params(cfg, case.batch_seed)
    ref_stats, g_ref = reference_grads(params, cfg, batch, lay.dp * lay.ep * n_micro)
    with local_world(cfg, lay) as (par, mode):
        stats, grads = sharded_grads(par, params, cfg, batch, n_micro, mode=mode)
        full = gather(par, grads, mode)
    assert not same_stats(stats, ref_stats, RTOL)
    assert max_rel_err(g_ref, full) < RTOL


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_world=4, uneven=False))
def test_sharded_step_equals_single_process(case):
    _check_case(case)


@pytest.mark.parametrize("name", [n for n in EXPLICIT if "uneven" not in n])
def test_hard_cases(name):
    """``parallel_cases.EXPLICIT`` (with equal label counts per shard: a simulated world needs equal
    shapes per rank; the gloo tier runs them uneven)."""
    _check_case(dataclasses.replace(EXPLICIT[name], uneven=False))


def _world(tp):
    """A world of ``tp`` ranks for a model every dim of which divides by 4."""
    cfg = ModelConfig(vision=tiny_vision(), llm=tiny_llm(n_kv_heads=4), image_token_id=255)
    return local_world(cfg, Layout(tp=tp))


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_forward_and_backward(tp):
    """Each collective against its definition, values and gradients, in a simulated world."""
    with _world(tp) as (par, mode):
        d: Dist = par.dist
        x = mode.rank_map(lambda r: torch.arange(8.0).reshape(1, 8, 1) * (r + 1))   # rank r holds (r+1)*x
        full = torch.arange(8.0).reshape(1, 8, 1)
        s = sum(range(1, tp + 1))

        def grad_of(fn, inp):
            inp = inp.detach().requires_grad_()
            out = fn(inp)
            (out * mode.rank_map(lambda r: torch.full_like(value_on(out, r), r + 1.0))).sum().backward()
            return out, inp.grad

        out, g = grad_of(lambda t: comm.reduce_from_tp(t, d), x)        # all-reduce / identity
        assert torch.equal(value_on(out, 0), full * s) and torch.equal(value_on(g, 1), torch.full_like(full, 2.0))
        out, g = grad_of(lambda t: comm.copy_to_tp(t, d), x)            # identity / all-reduce
        assert torch.equal(value_on(out, 1), full * 2) and torch.equal(value_on(g, 0), torch.full_like(full, s))
        out, g = grad_of(lambda t: comm.scatter_seq(t, d), x)           # split / all-gather
        assert torch.equal(value_on(out, 1), (full * 2)[:, 8 // tp:2 * 8 // tp])
        assert torch.equal(value_on(g, 0), torch.cat([torch.full((1, 8 // tp, 1), r + 1.0) for r in range(tp)], 1))
        out, g = grad_of(lambda t: comm.gather_seq(comm.scatter_seq(t, d), d), x)   # round trip
        assert torch.equal(value_on(out, 0), torch.cat([(full * (r + 1))[:, r * 8 // tp:(r + 1) * 8 // tp]
                                                       for r in range(tp)], 1))
        out, g = grad_of(lambda t: comm.reduce_scatter_seq(t, d), x)    # reduce-scatter / all-gather
        assert torch.equal(value_on(out, 1), (full * s)[:, 8 // tp:2 * 8 // tp])


def test_collectives_are_identity_without_a_group():
    x = torch.randn(2, 4, 3, requires_grad=True)
    d = Dist()
    for fn in (comm.copy_to_tp, comm.reduce_from_tp, comm.gather_seq, comm.scatter_seq, comm.enter_tp, comm.exit_tp):
        assert fn(x, d) is x
    assert comm.all_to_all(x, [2], [2], None) is x


def test_vmap_rule_of_tp_collectives():
    """Per-example gradients (vmap over grad) through copy_to_tp / reduce_from_tp in a tp=2 world."""
    with _world(2) as (par, mode):
        d = par.dist
        wgt = mode.rank_map(lambda r: torch.full((3,), r + 1.0))
        xs = torch.randn(5, 3)

        def f(wt, x):
            return comm.reduce_from_tp(comm.copy_to_tp(x, d) * wt, d).sum()
        per_ex = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(wgt, xs)
        assert torch.allclose(value_on(per_ex, 1), xs)


# ------------------------------------------------------------------------- context parallelism
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_world=4, cp=True, uneven=False), data=st.data())
def test_context_parallel_step_equals_single_process(case, data):
    """cp 2 or 4, alone or with tp / sp / ep / dp, packed or padded rows, windows, an image across a
    chunk boundary, the vision tower tp-sharded, replicated or frame-parallel: the step is exact."""
    cfg, batch, lay = case.cfg, case.batch(), case.layout
    n_micro = data.draw(st.sampled_from([m for m in (1, 2) if case.rows_per_shard % m == 0]), label="n_micro")
    params = model.init_params(cfg, case.batch_seed)
    ref_stats, g_ref = reference_grads(params, cfg, batch, lay.dp * lay.ep * n_micro)
    with local_world(cfg, lay, vision=case.vision) as (par, mode):
        stats, grads = sharded_grads(par, params, cfg, batch, n_micro, mode=mode)
        full = gather(par, grads, mode)
    assert not same_stats(stats, ref_stats, RTOL)
    assert max_rel_err(g_ref, full) < RTOL


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_chunks_and_kv_exchange(cp):
    """Rank i holds chunks i and 2cp-1-i; gather_kv returns every rank's rows in sequence order, and
    its backward sums every rank's gradient for a rank's own rows (reduce-scatter)."""
    cfg = ModelConfig(vision=tiny_vision(), llm=tiny_llm(n_kv_heads=4), image_token_id=255)
    with local_world(cfg, Layout(cp=cp)) as (par, mode):
        d = par.dist
        T = 2 * cp * 3
        seq = torch.arange(float(T)).reshape(1, 1, T, 1)
        for r in range(cp):
            want = [r, 2 * cp - 1 - r]
            assert value_on(comm.cp_slots(T, d), r).tolist() == [c * 3 + k for c in want for k in range(3)]
        mine = comm.cp_local(seq, d, 2).detach().requires_grad_()
        whole = comm.gather_kv(mine, d, 2)
        assert all(torch.equal(value_on(whole, r), seq) for r in range(cp))
        (whole * mode.rank_map(lambda r: torch.full((1, 1, T, 1), r + 1.0))).sum().backward()
        assert torch.equal(value_on(mine.grad, 0), torch.full((1, 1, T // cp, 1), float(sum(range(1, cp + 1)))))


def test_a_cp_rank_without_labels_adds_zero_not_nan():
    """Labels only in the first chunk: the other cp rank's CE and label count are 0 (not NaN), and
    the step still equals one process's."""
    cfg = ModelConfig(vision=tiny_vision(), llm=tiny_llm("llama3", n_kv_heads=4), image_token_id=255)
    params = model.init_params(cfg, 7)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]                       # targets at positions 0..2: chunk 0 of 4 (rank 0)
    batch = {"input_ids": ids, "labels": labels}
    ref_stats, g_ref = reference_grads(params, cfg, batch, 1)
    with local_world(cfg, Layout(cp=2)) as (par, mode):
        per_rank = {k: mode.rank_map(lambda r, v=v: v) for k, v in batch.items()}   # sliced per rank
        t = model.loss_terms(par.shard(params), cfg, per_rank, par.dist)
        assert float(value_on(t.n_tokens, 1)) == 0 and float(value_on(t.ce, 1)) == 0
        assert float(value_on(t.n_tokens, 0)) == 6
        stats, grads = sharded_grads(par, params, cfg, batch, 1, mode=mode)
        full = gather(par, grads, mode)
    assert not same_stats(stats, ref_stats, RTOL)
    assert max_rel_err(g_ref, full) < RTOL


@settings(max_examples=200, deadline=None)
@given(case=cases(max_world=4), cp_case=cases(max_world=4, cp=True),
       pp_case=cases(max_world=4, pp=True, fill=True), pp_cp_case=cases(max_world=4, pp=True, fill=True, cp=True))
def test_every_generated_row_trains_a_token(case, cp_case, pp_case, pp_cp_case):
    """The generators' promise that the tiers rely on (both tiers' variants): each row trains at least
    one token after the shift and the packing (CI once drew T = 5 packed, where the row's sure label
    opened segment 2)."""
    from neva.loss import label_count
    for c in (case, cp_case, pp_case, pp_cp_case):
        b = c.batch()
        for r in range(b["input_ids"].shape[0]):
            row = {k: v[r:r + 1] for k, v in b.items() if k in ("labels", "segment_ids")}
            assert int(label_count(row)) > 0, (c, r)
