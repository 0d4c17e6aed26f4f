"""Training step: autograd == torch.func, accumulation == one big batch, groups, schedule, NaN skip."""
import math

import pytest
import torch

from neva.batch import split
from neva.loss import label_count
from neva.params import flatten
from neva.train import optim
from neva.train import step as S
from train_helpers import batch, max_diff, params, tiny_cfg


def test_autograd_and_func_agree():
    cfg = tiny_cfg()
    p, b = params(cfg), batch(cfg)
    tr = optim.trainable_paths(p, optim.AdamW())
    mbs = split(b, cfg, 2)
    ga, sa = S.compute_grads(p, cfg, mbs, trainable=tr, mode="autograd")
    gf, sf = S.compute_grads(p, cfg, mbs, trainable=tr, mode="func")
    assert sa["loss"] == pytest.approx(sf["loss"], rel=1e-6)
    assert max_diff(ga, gf) < 1e-6
    assert set(ga) == set(tr) and all(float(g.abs().sum()) > 0 for k, g in ga.items() if "llm/layers" in k and "router" not in k)


def test_accumulation_equals_one_batch_with_uneven_label_counts():
    cfg = tiny_cfg(experts=0)                 # dense: the CE normalisation is the whole story
    p, b = params(cfg), batch(cfg, B=4)
    b["labels"][0, 10:] = -100                # micro-batches with different label counts
    tr = optim.trainable_paths(p, optim.AdamW())
    g1, s1 = S.compute_grads(p, cfg, [b], trainable=tr)
    g4, s4 = S.compute_grads(p, cfg, split(b, cfg, 4), trainable=tr)
    assert s1["n_tokens"] == s4["n_tokens"] == label_count(b)
    assert s4["loss"] == pytest.approx(s1["loss"], rel=1e-5)
    assert max_diff(g1, g4) < 1e-5


def test_split_batch_routes_images_and_checks_divisibility():
    cfg = tiny_cfg()
    b = batch(cfg, B=4)
    b["input_ids"][1, 2:2 + cfg.tokens_per_image] = 7           # row 1 has no image
    b["pixel_values"] = b["pixel_values"][:3]
    mbs = split(b, cfg, 2)
    assert [m["pixel_values"].shape[0] for m in mbs] == [1, 2]
    with pytest.raises(ValueError, match="does not divide the batch size 4"):
        split(b, cfg, 3)


def test_groups_freeze_and_scale_lr():
    cfg = tiny_cfg()
    p = params(cfg)
    opt = optim.AdamW(lr=1e-2, groups=(optim.Group(r"^projector/", lr_mult=0.5), optim.Group(".*", frozen=True)))
    setup = S.StepSetup(cfg, opt)
    st = S.init_state(p, setup)
    assert st.trainable and all(k.startswith("projector/") for k in st.trainable)
    before = {k: v.clone() for k, v in flatten(st.params).items()}
    S.train_step(st, [batch(cfg)], setup)
    after = flatten(st.params)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(st.trainable)
    # first Adam step moves each weight by ~lr * lr_mult (warmup 0, cosine at t=0)
    d = (after["projector/fc1/w"] - before["projector/fc1/w"]).abs().max()
    assert float(d) == pytest.approx(5e-3, rel=0.05)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        S.init_state(p, S.StepSetup(cfg, optim.AdamW(groups=(optim.Group(".*", frozen=True),))))


def test_weight_decay_is_decoupled():
    w = {"a": torch.ones(3)}
    opt = optim.AdamW(lr=0.1, weight_decay=0.5, clip=0)
    st = optim.init_state(w, opt)
    optim.update(w, {"a": torch.zeros(3)}, st, opt)        # zero gradient: only the decay acts
    assert torch.allclose(w["a"], torch.full((3,), 1 - 0.1 * 0.5))


def test_schedule_warmup_then_cosine():
    opt = optim.AdamW(lr=1.0, warmup=10, total=110, min_lr_ratio=0.1)
    assert optim.lr_at(0, opt) == pytest.approx(0.1)
    assert optim.lr_at(9, opt) == pytest.approx(1.0)
    assert optim.lr_at(60, opt) == pytest.approx(0.55)
    assert optim.lr_at(110, opt) == pytest.approx(0.1) and optim.lr_at(500, opt) == pytest.approx(0.1)


def test_fused_kernel_equals_op_by_op(monkeypatch):
    torch.manual_seed(0)
    w0 = {"a": torch.randn(5, 3), "b": {"c": torch.randn(7)}}
    opt = optim.AdamW(lr=0.1, weight_decay=0.3, clip=0.5, groups=(optim.Group("^b/", lr_mult=0.5, wd=0.0),))
    out = []
    for fused in (True, False):
        monkeypatch.setattr(optim, "FUSED", fused)
        w = {"a": w0["a"].clone(), "b": {"c": w0["b"]["c"].clone()}}
        st = optim.init_state(w, opt)
        for i in range(3):
            g = {"a": torch.full((5, 3), 0.3 * (i + 1)), "b/c": torch.linspace(-1, 1, 7)}
            optim.update(w, g, st, opt)
        out.append(flatten(w))
    assert max_diff(out[0], out[1]) < 1e-6 and max_diff(out[0], flatten(w0)) > 1e-2


def test_clipping_by_global_norm():
    w = {"a": torch.zeros(4)}
    opt = optim.AdamW(lr=1.0, clip=1.0, betas=(0.9, 0.95))
    st = optim.init_state(w, opt)
    g = {"a": torch.tensor([3.0, 4.0, 0.0, 0.0])}
    assert float(optim.global_norm(g)) == pytest.approx(5.0)
    optim.update(w, g, st, opt)                              # the moment sees the clipped gradient
    assert torch.allclose(st["m"]["a"], 0.1 * g["a"] / 5.0, atol=1e-6)


def test_nonfinite_loss_is_skipped_then_stops():
    cfg = tiny_cfg()
    p = params(cfg)
    setup = S.StepSetup(cfg, optim.AdamW(lr=1e-3), max_bad_steps=3)
    st = S.init_state(p, setup)
    good = batch(cfg)
    row = S.train_step(st, [good], setup)
    assert row["step"] == 1 and not row["skipped_now"]
    bad = dict(good, pixel_values=torch.full_like(good["pixel_values"], float("nan")))
    before = {k: v.clone() for k, v in flatten(st.params).items()}
    for i in range(2):
        row = S.train_step(st, [bad], setup)
        assert row["skipped_now"] and row["skipped"] == i + 1 and not math.isfinite(row["loss"])
    assert max_diff(before, flatten(st.params)) == 0 and st.step == 1
    S.train_step(st, [good], setup)                          # a good step resets the run of bad ones
    assert st.bad_in_row == 0 and st.step == 2
    for _ in range(2):
        S.train_step(st, [bad], setup)
    with pytest.raises(S.NonFiniteLoss, match="3 steps in a row"):
        S.train_step(st, [bad], setup)


def test_no_labels_is_a_clear_error():
    cfg = tiny_cfg()
    b = batch(cfg)
    b["labels"][:] = -100
    with pytest.raises(ValueError, match="no label tokens"):
        S.compute_grads(params(cfg), cfg, [b], trainable=["projector/fc1/w"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_train_as_the_unpadded_samples(monkeypatch, side):
    """A batch of a full row and a padded one gives the CE sums and gradients of the two samples run
    alone without padding. Right padding (the collate's) runs without a mask (causal attention keeps
    real tokens off the padding); left padding (generation's) builds one."""
    from neva import model
    cfg = tiny_cfg(experts=0)
    T, n = 32, 25                                      # row 1 keeps its first 25 tokens (the image and 7 more)
    p, b = params(cfg), batch(cfg, B=2, T=T)
    alone = [{k: v[i:i + 1] for k, v in b.items()} for i in range(2)]
    alone[1] = {**alone[1], "input_ids": alone[1]["input_ids"][:, :n], "labels": alone[1]["labels"][:, :n]}
    am = torch.ones(2, T, dtype=torch.long)
    ids, labels = b["input_ids"].clone(), b["labels"].clone()
    pad = slice(n, None) if side == "right" else slice(None, T - n)
    if side == "left":                                 # the kept tokens move to the row's end
        ids[1, T - n:], labels[1, T - n:] = b["input_ids"][1, :n].clone(), b["labels"][1, :n].clone()
    am[1, pad], ids[1, pad], labels[1, pad] = 0, 0, -100
    padded = {**b, "input_ids": ids, "labels": labels, "attention_mask": am}
    masks = []
    context = model.llm.context
    monkeypatch.setattr(model.llm, "context", lambda *a, **k: masks.append(k.get("mask")) or context(*a, **k))

    def ce(prm, bt):
        return model.loss_terms(prm, cfg, bt).ce
    g = torch.func.grad(ce)(p, padded)
    assert masks[-1] == (side == "left")
    ref = [torch.func.grad(ce)(p, a) for a in alone]
    assert float(ce(p, padded)) == pytest.approx(sum(float(ce(p, a)) for a in alone), rel=1e-5)
    gf, r0, r1 = flatten(g), flatten(ref[0]), flatten(ref[1])
    for k in gf:   # atol: a key bias's gradient is 0 up to rounding (softmax ignores a shift)
        torch.testing.assert_close(gf[k], r0[k] + r1[k], rtol=1e-4, atol=1e-6, msg=k)
