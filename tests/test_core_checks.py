"""Core pieces checked against the implementations they follow: the MoE balance loss against
transformers' Mixtral, the 2x2 downsampling projector against NeMo/VILA's ``flat_square``, and the
errors a batch whose image tokens and images disagree gets."""
import pytest
import torch

from neva import model, projector
from neva.layers import moe
from neva.comm import LOCAL
from train_helpers import batch, params, tiny_cfg


@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_is_mixtral_loss_over_top_k(masked):
    """Ours is the Switch loss per routing slot: transformers' Mixtral value divided by top_k
    (so the coefficient means the same for any k); padding tokens count in neither."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    g = torch.Generator().manual_seed(0)
    B, T, E, k = 3, 7, 8, 2
    logits = torch.randn(B * T, E, generator=g) * 2
    mask = (torch.rand(B, T, generator=g) > 0.3).long() if masked else None
    topi = logits.softmax(-1).topk(k, -1).indices
    aux, z = moe.balance_losses(logits, topi, None if mask is None else mask.reshape(-1), LOCAL)
    hf = load_balancing_loss_func((logits,), E, k, mask)
    assert float(aux) * k == pytest.approx(float(hf), rel=1e-6)
    keep = torch.ones(B * T, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    assert float(z) == pytest.approx(float(torch.logsumexp(logits[keep], -1).square().mean()), rel=1e-6)


def _flat_square(x):
    """NeMo / VILA's ``flat_square`` ([n, w, h, c] -> [n, w/2, h/2, 4c], zero-padding odd sides),
    copied as the reference."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("side", [4, 5, 27])
def test_downsample_is_nemo_flat_square(side):
    x = torch.randn(2, side * side, 6)
    want = _flat_square(x.view(2, side, side, 6))
    got = projector.downsample_2x2(x)
    assert torch.equal(got, want.reshape(2, -1, 24))


def test_image_tokens_and_images_must_agree():
    cfg = tiny_cfg()
    p, b = params(cfg), batch(cfg, B=2)
    with pytest.raises(ValueError, match=r"image tokens for 2 images \(per sample: \[1, 1\]\) but pixel_values holds 3"):
        model.forward(p, cfg, {**b, "pixel_values": torch.cat([b["pixel_values"], b["pixel_values"][:1]])})
    ids = b["input_ids"].clone()
    ids[1, 2] = 5                                           # one image token short in sample 1
    with pytest.raises(ValueError, match="sample 1 of the batch has .* not a multiple of tokens_per_image"):
        model.forward(p, cfg, {**b, "input_ids": ids})
