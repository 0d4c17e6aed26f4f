"""torch.func on the whole model: per-example gradients with ``vmap(grad(neva.loss))`` equal a loop of
``grad`` over the examples (image splice, MoE routing and the label-only loss without data-dependent
shapes), for a single tower and for the fused encoder's per-tower pixels."""
import warnings

import pytest
import torch

import neva
from neva.config import ModelConfig, fuse, tiny_llm, tiny_vision
from neva.params import flatten
from train_helpers import batch


@pytest.mark.parametrize("vision", ["siglip", "fused"])
def test_vmap_of_grad_equals_a_loop_over_examples(vision):
    v = fuse(tiny_vision("dino", n_layers=1), tiny_vision("siglip", n_layers=1)) if vision == "fused" else \
        tiny_vision("siglip", n_layers=1)
    cfg = ModelConfig(vision=v, llm=tiny_llm("mixtral", n_layers=1), image_token_id=255, moe_dispatch="dense")
    b = batch(cfg, B=3, T=28)
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    b["attention_mask"][1, -3:] = 0                  # a right-padded row: the mask is per example too
    b["labels"][1, -3:] = -100
    if vision == "fused":
        b["pixel_values"] = {"dino": b["pixel_values"], "siglip": -b["pixel_values"]}
    params = neva.init_params(cfg, 0)

    def one(p, ids, labels, mask, pix):              # one example: a batch of one row and its image
        return neva.loss(p, cfg, {"input_ids": ids[None], "labels": labels[None], "attention_mask": mask[None],
                                  "pixel_values": {k: t[None] for k, t in pix.items()} if isinstance(pix, dict) else pix[None]})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # SDPA's backward has no batching rule yet (slow path)
        per_ex = flatten(torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0, 0))(
            params, b["input_ids"], b["labels"], b["attention_mask"], b["pixel_values"]))
    pix = b["pixel_values"]
    for i in range(3):
        pi = {k: t[i] for k, t in pix.items()} if isinstance(pix, dict) else pix[i]
        ref = flatten(torch.func.grad(one)(params, b["input_ids"][i], b["labels"][i], b["attention_mask"][i], pi))
        errs = {k: float((per_ex[k][i] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref}
        assert max(errs.values()) < 1e-5   # fp32 rounding: the loop's head+CE runs fused and chunked, vmap's not
    assert float(per_ex["vision/" + ("dino/" if vision == "fused" else "") + "patch/w"].abs().sum()) > 0
