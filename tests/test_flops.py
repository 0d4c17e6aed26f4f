"""The config's FLOP count equals what torch's FlopCounterMode counts on a real forward."""
from __future__ import annotations

from dataclasses import replace

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import neva
from neva import flops, model
from neva.config import ModelConfig, ProjectorConfig, tiny_llm, tiny_vision
from neva.params import flatten

from train_helpers import batch


def _projector_weights(params: dict) -> list[tuple[int, ...]]:
    return [tuple(v.shape) for k, v in flatten(params).items() if k.startswith("projector/")]


@pytest.mark.parametrize("llm,vision,projector", [("mixtral", "siglip", "mlp2x_gelu"), ("llama2", "clip", "mlp2x_gelu"),
                                                  ("nemotron", "dino", "mlp_downsample"), ("llama3", "siglip", "linear")])
def test_forward_flops_match_flop_counter(llm, vision, projector):
    cfg = ModelConfig(vision=tiny_vision(vision, n_layers=2, select_layer=-1 if vision == "siglip" else -2),
                      llm=tiny_llm(llm, n_layers=2), projector=ProjectorConfig(kind=projector), image_token_id=255)
    if llm == "nemotron":
        cfg = replace(cfg, llm=replace(cfg.llm, tie_embeddings=False))
    p = model.init_params(cfg, 0)
    b = batch(cfg, B=3, T=40)
    n_label = int((b["labels"][:, 1:] != -100).sum())
    # SDPA's math path: the CPU flash kernel has no FlopCounterMode formula, the math path's products do
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        neva.loss(p, cfg, b)
    want = counter.get_total_flops()
    got = flops.forward_flops(cfg, _projector_weights(p), batch=3, seq=40, n_images=3, n_label=n_label)
    assert got == want, (got, want, counter.get_flop_counts())
