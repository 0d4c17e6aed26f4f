"""Generation under a plan, for pool jobs: every rank generates with its shard of the params, or
rank 0 serves requests the others follow (``neva.generate.on_plan`` / ``follow`` / ``release``), and
held-out evaluation as a sharded training run does it. Each function takes ``rank`` first
(``GlooPool.run`` passes it) and returns its result on rank 0.
"""
from __future__ import annotations

from neva import generate as gen
from neva.config import ModelConfig
from neva.parallel.plan import Layout
from neva.testing.worlds import parallel


def sharded_tokens(rank: int, layout: Layout, cfg: ModelConfig, params: dict, prompts: list[list[int]],
                   pixel_values, sampling: gen.Sampling) -> tuple[list[list[int]], int]:
    """Every rank calls ``generate`` with the same prompts and its shard -> each rank's (tokens, kv
    heads its cache held): all ranks must agree on the tokens, and the cache hold the local heads."""
    par = parallel(cfg, layout)
    real, heads = gen.init_cache, []

    def spy(*a, **k):
        cache = real(*a, **k)
        heads.append(cache[0]["k"].shape[1])
        return cache
    gen.init_cache = spy
    try:
        tokens = gen.generate(par.shard(params), cfg, prompts, pixel_values, sampling, dist=par.dist)["tokens"]
    finally:
        gen.init_cache = real
    return tokens, heads[0]


def served_tokens(rank: int, layout: Layout, cfg: ModelConfig, params: dict, requests: list[tuple]):
    """Rank 0 serves ``requests`` ((prompts, pixel_values, sampling) each) with ``on_plan``, then
    ``release``s; the other ranks ``follow`` and never see the requests themselves. -> rank 0: (the
    tokens of each request, the tokens its ``on_token`` streamed per row); others: how many requests
    they followed."""
    par = parallel(cfg, layout)
    local = par.shard(params)
    if not par.main:
        return gen.follow(par, local)
    out, streamed = [], []
    for req in requests:
        steps = []
        out.append(gen.on_plan(par, local, *req, on_token=lambda t, done: steps.append(t.tolist()))["tokens"])
        streamed.append([list(r) for r in zip(*steps)])          # per row, as streamed
    gen.release(par)
    return out, streamed


def eval_answers(rank: int, layout: Layout | None, cfg: ModelConfig, params: dict, exp) -> list[dict] | None:
    """Held-out answers of ``exp``'s eval sets as a training run's final evaluation gets them (the
    answers of ``samples.jsonl``), under ``layout`` with this rank's shard (``rank``/``layout`` None:
    one process, the whole model) -> [{"modality", "id", "pred", ...}] on rank 0 / in one process."""
    import json
    from pathlib import Path

    from neva.data import tokenizers
    from neva.train import report

    par = None if layout is None else parallel(cfg, layout)
    if par is not None:
        par.gather = _no_gather              # the point: no rank ever holds the whole model
    sets = report.eval_sets(exp, cfg, tokenizers.load(exp.data.tokenizer))
    local = params if par is None else par.shard(params)
    if not report.final_eval(local, cfg, sets, {}, exp, par=par):
        return None
    return [json.loads(line) for line in (Path(exp.run.dir) / "samples.jsonl").read_text().splitlines()]


def _no_gather(*a, **k):
    raise AssertionError("evaluation under a plan gathered the model")
