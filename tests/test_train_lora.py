"""LoRA: zero effect at init, only LoRA leaves train (autograd and torch.func agree), merge on export."""
import pytest
import torch
from train_helpers import batch, max_diff, params, tiny_cfg

from neva import model
from neva.params import flatten
from neva.train import lora, optim
from neva.train import step as S
from neva.train.metrics import read_metrics


@pytest.mark.parametrize("targets", ["attn", "mlp", "all"])
def test_lora_trains_only_its_leaves_and_merges(targets):
    cfg = tiny_cfg()
    base = params(cfg)
    b = batch(cfg)
    lc = lora.LoraConfig(targets=targets, rank=4, alpha=8)
    p = lora.add(base, lc)
    added = [k for k in flatten(p) if k.endswith(("_lora_a", "_lora_b"))]
    want = {"attn": 4, "mlp": 3, "all": 7}[targets] * cfg.llm.n_layers * 2
    assert len(added) == want
    if targets != "attn":
        assert flatten(p)["llm/layers/0/mlp/w1_lora_a"].shape == (4, 4, 64)    # one LoRA per expert
    ref = model.forward(base, cfg, b)["logits"]
    assert torch.equal(model.forward(lora.materialize(p, lc.scale), cfg, b)["logits"], ref)  # b = 0 at init
    setup = S.StepSetup(cfg, optim.AdamW(lr=1e-2, groups=lora.groups()), prepare=lambda t: lora.materialize(t, lc.scale))
    st = S.init_state(p, setup)                            # takes ownership: updates in place
    p = {k: v.clone() for k, v in flatten(p).items()}
    assert sorted(st.trainable) == sorted(added)
    for _ in range(3):
        S.train_step(st, [b], setup)
    after = flatten(st.params)
    for k, v in p.items():
        assert torch.equal(after[k], v) != (k in added), k
    merged = lora.merge(st.params, lc.scale)
    assert set(flatten(merged)) == set(flatten(base))
    assert torch.allclose(model.forward(merged, cfg, b)["logits"], model.forward(lora.materialize(st.params, lc.scale), cfg, b)["logits"], atol=1e-5)
    assert not torch.allclose(model.forward(merged, cfg, b)["logits"], ref, atol=1e-4)


def test_lora_grads_autograd_equal_func():
    cfg = tiny_cfg()
    p = lora.add(params(cfg), lora.LoraConfig("attn", rank=2))
    flat = flatten(p)
    for k in flat:
        if k.endswith("_lora_b"):
            flat[k].normal_(0, 0.1)                       # nonzero b so every LoRA leaf gets a gradient
    prep = lambda t: lora.materialize(t, 2.0)              # noqa: E731
    tr = optim.trainable_paths(p, optim.AdamW(groups=lora.groups()))
    ga, _ = S.compute_grads(p, cfg, [batch(cfg)], trainable=tr, prepare=prep)
    gf, _ = S.compute_grads(p, cfg, [batch(cfg)], trainable=tr, prepare=prep, mode="func")
    assert max_diff(ga, gf) < 1e-6 and all(float(g.abs().sum()) > 0 for g in ga.values())


def test_lora_bad_targets():
    with pytest.raises(ValueError, match="match no 2-D/3-D weight"):
        lora.add(params(tiny_cfg()), lora.LoraConfig(targets=r"^nothing/"))


def test_eval_during_training_sees_the_merged_model(tmp_path):
    """``eval_fn`` gets the params as they would be exported: fp32, LoRA merged (no factor leaves)."""
    from neva import experiment as X
    from neva.train import loop

    cfg = tiny_cfg()
    exp = X.Experiment(model=cfg, train=X.TrainConfig(steps=2, lr=1e-2, lora="attn", lora_rank=4, lora_alpha=8),
                       eval=X.EvalConfig(every=1), run=X.RunConfig(dir=str(tmp_path), progress=False,
                                                                   tensorboard=False, threads=1))
    p = lora.add(params(cfg), lora.LoraConfig("attn", rank=4, alpha=8))
    b = batch(cfg)
    seen = []

    def eval_fn(tree, step):
        seen.append(tree)
        return {"eval/x": 0.0}

    res = loop.train(exp, p, iter([b, b]), eval_fn=eval_fn)
    assert len(seen) == 1 and set(flatten(seen[0])) == set(flatten(params(cfg)))
    base, now, end = flatten(params(cfg)), flatten(seen[0]), flatten(lora.merge(res.state.params, 2.0))
    wq = [k for k in now if k.startswith("llm/") and k.endswith("attn/wq/w")]
    assert wq and all(now[k].dtype == torch.float32 for k in now)
    assert all(not torch.equal(now[k], base[k]) and not torch.equal(now[k], end[k]) for k in wq)  # step 1's LoRA
    assert "eval/x" in read_metrics(tmp_path)[0]
