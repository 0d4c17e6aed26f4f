"""The fused LM head + cross-entropy (``neva.loss.linear_cross_entropy_sum``) computes what the head and
the CE compute in two steps: the summed loss and the gradients of h and of the head's weight, over
several chunks of rows, under torch.autograd and torch.func, with a frozen head, with no rows, in
bf16, and vocab-parallel inside the sharded training step."""
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

from neva.comm import LOCAL
from parallel_cases import EXPLICIT
from test_parallel_local import _check_case

L = importlib.import_module("neva.loss")     # the module (the package's ``neva.loss`` is the loss function)


def _data(M=600, D=16, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, D, generator=g).to(dtype), torch.randn(V, D, generator=g).to(dtype),
            torch.randint(0, V, (M,), generator=g))


def _two_step(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("mode", ["autograd", "func"])
def test_fused_equals_two_steps(mode):
    h, w, t = _data()
    assert h.shape[0] > 2 * L.CE_CHUNK_ROWS                # three chunks, the last one short
    if mode == "autograd":
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = L.linear_cross_entropy_sum(hr, wr, t, LOCAL)
        gh, gw = torch.autograd.grad(3 * loss, (hr, wr))    # a loss gradient other than 1 scales both
    else:
        loss = L.linear_cross_entropy_sum(h, w, t, LOCAL)
        gh, gw = torch.func.grad(lambda a, b: 3 * L.linear_cross_entropy_sum(a, b, t, LOCAL), argnums=(0, 1))(h, w)
    rh, rw = torch.func.grad(lambda a, b: 3 * _two_step(a, b, t), argnums=(0, 1))(h, w)
    assert _rel(loss, _two_step(h, w, t)) < 1e-6
    assert _rel(gh, rh) < 1e-5 and _rel(gw, rw) < 1e-5


def test_frozen_head_no_grad_and_no_rows():
    h, w, t = _data()
    gh = torch.func.grad(lambda a: L.linear_cross_entropy_sum(a, w, t, LOCAL))(h)      # w frozen: h only
    assert _rel(gh, torch.func.grad(lambda a: _two_step(a, w, t))(h)) < 1e-5
    with torch.no_grad():
        assert _rel(L.linear_cross_entropy_sum(h, w, t, LOCAL), _two_step(h, w, t)) < 1e-6
    h0 = h[:0].clone().requires_grad_()
    w0 = w.clone().requires_grad_()
    loss = L.linear_cross_entropy_sum(h0, w0, t[:0], LOCAL)         # a cp rank whose chunks hold no label
    g = torch.autograd.grad(loss, (h0, w0))
    assert float(loss.detach()) == 0 and g[0].shape == h0.shape and float(g[1].abs().sum()) == 0


def test_bf16_keeps_dtypes_and_tracks_fp32():
    h, w, t = _data(dtype=torch.bfloat16)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    gh, gw = torch.autograd.grad(L.linear_cross_entropy_sum(hr, wr, t, LOCAL), (hr, wr))
    rh, rw = torch.func.grad(lambda a, b: _two_step(a, b, t), argnums=(0, 1))(h.float(), w.float())
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert _rel(gh, rh) < 2e-2 and _rel(gw, rw) < 2e-2


@pytest.mark.parametrize("name", ["window<T tp2+sp packed", "ep2 tp2+sp padded"])
def test_vocab_parallel_chunks_in_the_sharded_step(monkeypatch, name):
    """Under tp2 the chunks of the fused CE all-reduce max, picked logit and sum per chunk; with chunks
    of 5 rows the sharded step's gradients still equal one process's."""
    monkeypatch.setattr(L, "CE_CHUNK_ROWS", 5)
    chunks = []
    forward = L._LinearCE.forward
    monkeypatch.setattr(L._LinearCE, "forward", staticmethod(lambda h, *a: chunks.append(h.shape[0]) or forward(h, *a)))
    _check_case(dataclasses.replace(EXPLICIT[name], uneven=False))
    assert chunks and all(isinstance(m, int) and m > 5 for m in chunks), chunks   # several chunks per call


def test_a_row_far_past_its_target_keeps_its_exact_loss():
    """A row whose target's probability underflows fp32 (a loss of ~200 nats) gets its exact CE, not
    inf: the fast path reads -log p[target], which holds to ~87 nats."""
    h, w, t = _data(M=8, V=50)
    h = h.clone()
    h[3] = w[(t[3] + 1) % 50] * 60                    # row 3's logits favour another token by far
    loss = L.linear_cross_entropy_sum(h.requires_grad_(), w, t, LOCAL)
    ref = _two_step(h.detach(), w, t)
    assert float(ref) > 150 and _rel(loss, ref) < 1e-6
