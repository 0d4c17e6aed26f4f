"""Generation under the plan on four gloo processes: tp (the training plan's sp switched off), ep and
tp x ep give the single-process greedy tokens for left-padded prompts with an image, a two-frame
video and text only; a server's rank 0 broadcasts its requests to ranks that follow; and a sharded
run's held-out evaluation answers what the gathered model answers."""
import dataclasses

import pytest
import torch

from neva import model
from neva.comm import Dist
from neva.config import ModelConfig, tiny_llm, tiny_vision
from neva.generate import Sampling, generate
from neva.parallel.plan import Layout
from neva.testing import generation
from test_train_generate import prompts_and_images


def _cfg(kind: str, **kw) -> ModelConfig:
    llm = tiny_llm(kind, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_layers=2, eos_id=None, **kw)
    return ModelConfig(vision=tiny_vision("siglip", dim=32, n_layers=1, mlp_dim=64), llm=llm, image_token_id=255)


def _params(cfg, seed=0):
    """Random weights scaled up so the logits are decisive: a sharded reduction's last-bit
    differences must not flip an argmax tie (the test is about the plan, not about rounding)."""
    p = model.init_params(cfg, seed)
    head = "lm_head" if "lm_head" in p["llm"] else "embed"
    return {**p, "llm": {**p["llm"], head: {"w": p["llm"][head]["w"] * 8}}}


SAMPLING = Sampling(max_new_tokens=5)
CASES = {                                             # layout, LLM kind, what it shows
    "tp2+sp x dp2": (Layout(tp=2, dp=2, sp=True), "mistral"),   # the training plan's sp is off for decode
    "ep2 x dp2": (Layout(ep=2, dp=2), "mixtral"),
    "tp2 x ep2": (Layout(tp=2, ep=2), "mixtral"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_greedy_equals_one_process(gloo_pool, name):
    layout, kind = CASES[name]
    cfg = _cfg(kind, sliding_window=6 if kind == "mistral" else None)
    params = _params(cfg)
    ps, pix = prompts_and_images(cfg)
    want = generate(params, cfg, ps, pix, SAMPLING)["tokens"]
    got = gloo_pool.run(generation.sharded_tokens, layout, cfg, params, ps, pix, SAMPLING)
    assert all(len(t) == SAMPLING.max_new_tokens for t in want)
    assert [t for t, _ in got] == [want] * 4, name
    assert [h for _, h in got] == [cfg.llm.n_kv_heads // layout.tp] * 4      # the cache holds the local kv heads


def test_rank0_serves_the_others_follow(gloo_pool):
    """Rank 0 alone has the requests (a batch of three, then one prompt sampled with a seed) and
    streams the tokens; the others follow until release: two requests each."""
    cfg = _cfg("mixtral")
    params = _params(cfg, seed=1)
    ps, pix = prompts_and_images(cfg, seed=2)
    sampled = Sampling(max_new_tokens=4, temperature=1.0, top_k=5, seed=7)
    reqs = [(ps, pix, SAMPLING), (ps[:1], pix[:1], sampled)]
    want = [generate(params, cfg, *r)["tokens"] for r in reqs]
    got = gloo_pool.run(generation.served_tokens, Layout(tp=2, ep=2, sp=True), cfg, params, reqs)
    assert got == [(want, want), 2, 2, 2]             # rank 0 streamed every token it returned


def test_pipeline_generation_is_refused():
    cfg = _cfg("llama2")
    with pytest.raises(NotImplementedError, match="parallel.pp=1"):
        generate(model.init_params(cfg), cfg, [[1, 2]], dist=Dist(pp=object(), pp_size=2))


def test_sharded_eval_answers_equal_the_gathered_model(gloo_pool, tmp_path):
    """The final evaluation of a tp2 x dp2 run (every rank generating with its shard) writes the
    answers the whole model gives in one process: images and video, the real tokenizer."""
    from data_helpers import synth_dir
    from neva.data.config import DataConfig
    from neva.experiment import Experiment, EvalConfig, RunConfig

    root = synth_dir()
    llm = tiny_llm("llama2", vocab_size=32064, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64)
    cfg = ModelConfig(vision=tiny_vision("siglip", dim=32, n_layers=1, mlp_dim=64), llm=llm, image_token_id=32000)
    params = _params(cfg, seed=3)
    data = DataConfig(eval_path=f"{root / 'eval.jsonl'},{root / 'video_eval.jsonl'}",
                      video_folder=str(root / "videos.tar"))
    exp = Experiment(model=cfg, data=data, eval=EvalConfig(max_new_tokens=4, batch_size=8, max_samples=6, show=0))
    (tmp_path / "one").mkdir(), (tmp_path / "tp").mkdir()
    one = generation.eval_answers(None, None, cfg, params, dataclasses.replace(exp, run=RunConfig(dir=str(tmp_path / "one"))))
    got = gloo_pool.run(generation.eval_answers, Layout(tp=2, dp=2, sp=True), cfg, params,
                        dataclasses.replace(exp, run=RunConfig(dir=str(tmp_path / "tp"))))
    assert {s["modality"] for s in one} == {"image", "video"} and len(one) == 8
    assert got[0] == one and got[1:] == [None] * 3
