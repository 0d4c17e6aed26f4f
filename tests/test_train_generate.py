"""Generation: the KV-cached decoder equals a full forward each step, greedy equals transformers'
``LlavaForConditionalGeneration.generate``, and each logits processor does what it says."""
import pytest
import torch

from neva import model
from neva.generate import Sampling, generate, process_logits
from train_helpers import params, tiny_cfg


def prompts_and_images(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    per = cfg.tokens_per_image
    img = [cfg.image_token_id] * per
    ps = [[1] + img + torch.randint(3, 200, (5,), generator=g).tolist(),                  # one image
          [1, 7, 9] + img + img + [11, 12],                                                   # a 2-frame "video"
          [1] + torch.randint(3, 200, (3,), generator=g).tolist()]                            # text only
    pix = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ps, pix


def reference_greedy(p, cfg, prompts, pix, n):
    """No cache: the full (left-padded) sequence through model.forward for every new token."""
    outs = []
    start = 0
    for pr in prompts:
        k = sum(1 for t in pr if t == cfg.image_token_id) // cfg.tokens_per_image
        seq = list(pr)
        for _ in range(n):
            b = {"input_ids": torch.tensor([seq])}
            if k:
                b["pixel_values"] = pix[start:start + k]
            logits = model.forward(p, cfg, b)["logits"][0, -1]
            logits[cfg.image_token_id] = float("-inf")
            seq.append(int(logits.argmax()))
        start += k
        outs.append(seq[len(pr):])
    return outs


@pytest.mark.parametrize("experts,window", [(4, None), (0, 6)])
def test_cached_batch_equals_uncached_greedy(experts, window):
    cfg = tiny_cfg(experts=experts, sliding_window=window, eos_id=None)
    p = params(cfg, seed=1)
    ps, pix = prompts_and_images(cfg)
    got = generate(p, cfg, ps, pix, Sampling(max_new_tokens=6))
    assert got["tokens"] == reference_greedy(p, cfg, ps, pix, 6)
    assert got["finish"] == ["length"] * 3


def test_processors():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    seen = torch.tensor([[1, 2]])
    out = process_logits(logits, seen, Sampling(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, 1.0, -2.0, 0.5]]
    out = process_logits(logits, seen, Sampling(temperature=1.0, top_k=2))
    assert torch.isinf(out).tolist() == [[False, False, True, True]]
    # top_p: probs of [1, 2, -1, .5] are ~[.23, .63, .03, .11]; 0.8 keeps 2 then 1
    out = process_logits(logits, seen, Sampling(temperature=1.0, top_p=0.8))
    assert torch.isinf(out).tolist() == [[False, False, True, True]]
    out = process_logits(logits, seen, Sampling(temperature=0.5))
    assert torch.allclose(out, logits * 2)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    cfg = tiny_cfg(eos_id=None)
    p = params(cfg, seed=2)
    ps, pix = prompts_and_images(cfg)
    greedy = generate(p, cfg, ps, pix, Sampling(max_new_tokens=5))["tokens"]
    assert generate(p, cfg, ps, pix, Sampling(max_new_tokens=5, temperature=1.3, top_k=1, seed=4))["tokens"] == greedy
    s = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3)
    a, b = generate(p, cfg, ps, pix, s)["tokens"], generate(p, cfg, ps, pix, s)["tokens"]
    assert a == b and a != greedy


class CharTok:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_and_eos():
    cfg = tiny_cfg(eos_id=None)
    p = params(cfg, seed=1)
    ps, pix = prompts_and_images(cfg)
    full = generate(p, cfg, ps, pix, Sampling(max_new_tokens=8), tokenizer=CharTok())
    stop = full["text"][0][3:5]                                   # a stop string that appears in row 0
    got = generate(p, cfg, ps, pix, Sampling(max_new_tokens=8, stop_strings=(stop,)), tokenizer=CharTok())
    assert got["finish"][0] == "stop" and got["text"][0] == full["text"][0][:full["text"][0].index(stop)]
    assert len(got["tokens"][0]) <= 5
    eos = full["tokens"][1][2]                                    # make row 1's third token the eos
    cfg_e = tiny_cfg(eos_id=eos)
    got = generate(p, cfg_e, ps, pix, Sampling(max_new_tokens=8))
    assert got["finish"][1] == "eos" and got["tokens"][1] == full["tokens"][1][:full["tokens"][1].index(eos)]
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(p, cfg, ps, pix, Sampling(stop_strings=("x",)))


def _hf_tiny_llava(folder, moe: bool, window: int | None = None):
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, MistralConfig, MixtralConfig,
                              SiglipVisionConfig)
    torch.manual_seed(0)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    tc = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw) if moe else MistralConfig(sliding_window=window, **kw)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=299, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu")
    m = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # random init of HF is small; make logits decisive so argmax ties cannot differ
        for n, w in m.named_parameters():
            if w.dim() >= 2:
                w.normal_(0, 0.08)
    m.save_pretrained(folder)
    return m


@pytest.mark.parametrize("moe,window", [(True, None), (False, None), (False, 6)],
                         ids=["mixtral", "mistral", "mistral-window6"])
def test_greedy_matches_transformers(tmp_path, moe, window):
    """Mixtral, Mistral, and a Mistral whose sliding window (6) is shorter than both prompts (22 and 37
    tokens), so prefill and every cached decode step drop keys; the window must change the answer."""
    hf_mod = pytest.importorskip("neva.hf")
    hf = _hf_tiny_llava(tmp_path / "llava", moe, window)
    cfg, p = hf_mod.load(str(tmp_path / "llava"))
    assert cfg.llm.sliding_window == window
    ps, pix = prompts_and_images(cfg, seed=3)
    assert all(len(pr) > (window or 0) for pr in ps[:2])
    if window:
        import dataclasses
        full = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, sliding_window=None))
        unwindowed = generate(p, full, ps[:2], pix[:3], Sampling(max_new_tokens=8, stop_at_eos=False))["tokens"]
    ours = generate(p, cfg, ps[:2], pix[:3], Sampling(max_new_tokens=8, stop_at_eos=False))["tokens"]
    for i, pr in enumerate(ps[:2]):                   # HF one prompt at a time (no padding ambiguity)
        imgs = pix[:1] if i == 0 else pix[1:3]
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([pr]), pixel_values=imgs, attention_mask=torch.ones(1, len(pr), dtype=torch.long),
                              max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, len(pr):].tolist() == ours[i]
    if window:
        assert unwindowed != ours
