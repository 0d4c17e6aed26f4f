"""Gradients against transformers, not only logits (a stray ``.detach()`` keeps forward parity exact):
every parameter's ``.grad`` of ``LlavaForConditionalGeneration`` after ``loss.backward()`` equals
``torch.func.grad(neva.loss)`` mapped through the HF key table (``neva.hf.keys``, the in-memory layout
of transformers 5: fused experts), leaf by leaf. A parameter the HF forward does not use (vision layers
past the selected one, SigLIP's pooling head) must have no gradient there, and none here either.

SigLIP + Mixtral (MoE balance loss off and on: HF's ``load_balancing_loss_func`` per layer on the
router logits its gates return) and CLIP + Llama (tied embeddings); MHA, GQA and MQA (4, 2, 1 kv
heads); right- and left-padded batches (left padding with positions counted from the first real token,
as generation does)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import neva
import neva.hf
from neva.hf import keys as K
from neva.params import flatten

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from test_hf_llava import batch_for, make_clip_llama, make_siglip_mixtral, randomize  # noqa: E402

MAKERS = {"siglip_mixtral": make_siglip_mixtral, "clip_llama": make_clip_llama}

RTOL = 2e-6      # measured: at most 7e-7
TOL = 1e-6       # logits, as tests/test_hf_parity.py


class _Grads:
    """HF gradients seen as a checkpoint, so ``keys.read`` maps them into our layout."""

    def __init__(self, grads: dict):
        self.g = grads
        self.keys = set(grads)

    def read(self, key, index=()):
        return self.g[key][tuple(index)]


def make(kind: str, kv: int, folder) -> tuple:
    torch.manual_seed(kv)
    hf = randomize(MAKERS[kind](num_key_value_heads=kv), seed=30 + kv, scale=0.1)
    hf.save_pretrained(folder)
    return hf, *neva.hf.load(str(folder))


def hf_loss(hf, cfg, b, aux_coef: float):
    """(HF's loss: mean CE over the label tokens plus, with aux_coef, the MoE balance loss in our
    convention: per layer HF's Mixtral loss / top_k, averaged over layers; HF's logits)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits = []
    hooks = []
    if aux_coef:
        for layer in hf.model.language_model.layers:
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o[0])))
    try:
        out = hf(**b)
    finally:
        for h in hooks:
            h.remove()
    loss = out.loss
    if aux_coef:
        E, k = cfg.llm.n_experts, cfg.llm.top_k
        per_layer = [load_balancing_loss_func((lg,), E, k, b["attention_mask"]) / k for lg in logits]
        assert len(per_layer) == cfg.llm.n_layers
        loss = loss + aux_coef * torch.stack(per_layer).mean()
    return loss, out.logits.detach()


CASES = [("siglip_mixtral", kv, aux, left) for kv in (4, 2, 1) for aux in (0.0, 0.05) for left in (False, True)] + \
        [("clip_llama", kv, 0.0, left) for kv in (4, 2, 1) for left in (False, True)]


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    cache = {}

    def get(kind, kv):
        if (kind, kv) not in cache:
            cache[kind, kv] = make(kind, kv, tmp_path_factory.mktemp(f"{kind}_{kv}"))
        return cache[kind, kv]
    return get


@pytest.mark.parametrize("kind,kv,aux,left", CASES,
                         ids=[f"{k}-kv{kv}-aux{a}-{'left' if lf else 'right'}" for k, kv, a, lf in CASES])
def test_every_hf_grad_equals_func_grad_of_neva_loss(llavas, kind, kv, aux, left):
    hf, cfg, params = llavas(kind, kv)
    if cfg.llm.n_experts:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, aux_loss_coef=aux, z_loss_coef=0.0))
    b = batch_for(cfg, with_labels=True, left=left)
    hf.zero_grad(set_to_none=True)
    ref_loss, ref_logits = hf_loss(hf, cfg, b, aux)                  # eval mode: no dropout, no router jitter
    ref_loss.backward()
    ours = flatten(torch.func.grad(neva.loss)(params, cfg, b))
    ref = float(ref_loss.detach())
    assert abs(float(neva.loss(params, cfg, b)) - ref) < 1e-5 * abs(ref)
    with torch.no_grad():
        logits = neva.forward(params, cfg, b)["logits"]
    keep = b["attention_mask"].bool()
    assert (logits[keep] - ref_logits[keep]).abs().max() < TOL

    hf_params = dict(hf.named_parameters())
    lay = K.detect_llava(set(hf_params), "in-memory")
    assert lay.moe == ("fused" if kind == "siglip_mixtral" else "block_sparse_moe")
    grads = _Grads({n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in hf_params.items()})
    covered, errs = set(), {}
    tree = max(float(g.abs().max()) for g in ours.values())
    for path, g in ours.items():
        r = K.rule(path, tuple(g.shape), lay)
        covered |= set(r.keys)
        want = K.read(grads, r)
        assert want.shape == g.shape, path
        if path.endswith("attn/wk/b"):   # zero by construction (softmax ignores a shift per query): rounding on both
            assert float(want.abs().max()) < 1e-6 * tree and float(g.abs().max()) < 1e-6 * tree, path
            continue
        scale = float(want.abs().max())
        if scale == 0:   # unused by both forwards: the vision layers past the selected one, the final norm
            assert path.startswith(("vision/layers/", "vision/post_norm/")) and not g.any(), path
            continue
        errs[path] = float((g - want).abs().max()) / scale
    unused = sorted(n for n in hf_params if n not in covered)
    assert all(hf_params[n].grad is None or not hf_params[n].grad.any() for n in unused), unused
    assert all(n.startswith("model.vision_tower.") for n in unused), unused     # only the tower's unused tail
    worst = max(errs, key=errs.get)
    print(f"{kind} kv{kv} aux{aux} {'left' if left else 'right'}: worst {worst} {errs[worst]:.1e}")
    assert errs[worst] < RTOL, (worst, errs[worst])
    if aux:   # the balance loss reaches the routers: with it off their gradients differ
        off = flatten(torch.func.grad(neva.loss)(params, dataclasses.replace(
            cfg, llm=dataclasses.replace(cfg.llm, aux_loss_coef=0.0)), b))
        assert (off["llm/layers/0/mlp/router"] - ours["llm/layers/0/mlp/router"]).abs().max() > 100 * RTOL
