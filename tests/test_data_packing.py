"""Packing: the bins are right, and a packed batch has the loss and gradients of the same samples
unpacked (positions restart per sample, attention and targets never cross samples)."""
import numpy as np
import pytest
import torch

import neva
from data_helpers import synth_dir, tiny_model
from neva.data import DataConfig, NevaDataset
from neva.data.collate import collate
from neva.data.packing import first_fit_decreasing, first_fit_shuffle, padding_fraction
from neva.model import loss_terms


def naive_first_fit(lengths, order, cap):
    rows, free = [], []
    for i in order:
        for r, f in enumerate(free):
            if f >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(cap - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_first_fit_matches_the_naive_algorithm(seed):
    rs = np.random.RandomState(seed)
    lengths = rs.randint(1, 100, size=300)
    ffd = first_fit_decreasing(lengths, 128)
    assert ffd == naive_first_fit(lengths, np.argsort(-lengths, kind="stable"), 128)
    ffs = first_fit_shuffle(lengths, 128, seed=seed)
    assert ffs == naive_first_fit(lengths, np.random.default_rng([seed, 7]).permutation(300), 128)
    for rows in (ffd, ffs):
        assert sorted(i for r in rows for i in r) == list(range(300))         # every sample exactly once
        assert max(int(lengths[r].sum()) for r in rows) <= 128
    assert len(ffd) <= len(ffs)
    assert padding_fraction(lengths, ffd, 128) == pytest.approx(1 - lengths.sum() / (128 * len(ffd)))
    with pytest.raises(ValueError, match="sample 0 has 200 tokens > max_len=128"):
        first_fit_decreasing([200, 3], 128)


def grads_and_loss(params, cfg, batch, n_total):
    def f(p):
        return loss_terms(p, cfg, batch).ce / n_total
    return torch.func.grad_and_value(f)(params)


@pytest.mark.parametrize("kind", ["llama2", "mixtral"])
def test_packed_batch_equals_unpacked(kind):
    """Same samples, two layouts, one normaliser (the total label count): equal CE and gradients.
    MoE (mixtral): the CE part is equal too; the load-balancing aux loss is not compared, because its
    per-expert token fractions are means over the batch's valid tokens, which the layouts group differently."""
    mc = tiny_model(kind)
    cfg = DataConfig(data_path=str(synth_dir() / "train.jsonl"), max_seq_len=160, num_workers=0)
    ds = NevaDataset(cfg, mc)
    idx = list(range(7))
    samples = [ds[i] for i in idx]
    rows = first_fit_decreasing(ds.lengths[idx], 160)
    assert len(rows) < len(idx) and max(len(r) for r in rows) >= 2           # something is really packed
    packed = collate([[samples[i] for i in r] for r in rows], packed=True, pad_to=160)
    unpacked = collate([[s] for s in samples], packed=False)
    for b in (packed, unpacked):
        b.pop("_stats")
    assert packed["pixel_values"].shape == unpacked["pixel_values"].shape == (7, 3, 32, 32)
    assert int(packed["segment_ids"].max()) >= 2
    for pos, seg in zip(packed["position_ids"], packed["segment_ids"]):   # positions restart per sample
        for k in range(1, int(seg.max()) + 1):
            assert pos[seg == k].tolist() == list(range(int((seg == k).sum())))
    # (RoPE is relative, so the loss alone could not see a missing restart; dropping segment_ids it does see)
    n = int((unpacked["labels"] != -100).sum())
    assert n == int((packed["labels"] != -100).sum())
    params = neva.init_params(mc, seed=3)
    g_p, l_p = grads_and_loss(params, mc, packed, n)
    g_u, l_u = grads_and_loss(params, mc, unpacked, n)
    assert torch.allclose(l_p, l_u, rtol=1e-5, atol=1e-6)
    for path, a in _leaves(g_p):
        b = _get(g_u, path)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), path


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree
