"""Held-out question answering: exact-match accuracy per question type, next to the prior.

A held-out record carries ``qtype`` and ``answer`` (``neva.data.synthetic`` writes them; any LLaVA
file with those two fields works). The model answers each question by greedy generation from the
template's open assistant turn; the answer is right if, stripped and lower-cased, it equals the
reference. The *prior* of a type is the accuracy of always giving that type's most common training
answer: what a model that ignores the image scores.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import torch

from neva.batch import media_cat, media_count
from neva.comm import LOCAL, Dist
from neva.config import ModelConfig
from neva.generate import Sampling, generate
from neva.progress import Progress


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def training_answers(records) -> dict[str, Counter]:
    """qtype -> Counter of answers, from training records whose ``qtypes`` list the type of each
    gpt turn in order (or whose ``qtype`` names the type of their single answer)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        answers = [t.text for t in r.turns if t.role == "assistant"]
        types = r.meta.get("qtypes") or ([r.meta["qtype"]] if "qtype" in r.meta else [])
        for qt, a in zip(types, answers):
            out[qt][normalize(a)] += 1
    return dict(out)


def prior_answers(counts: dict[str, Counter]) -> dict[str, str]:
    return {qt: c.most_common(1)[0][0] for qt, c in counts.items() if c}


@torch.no_grad()
def answer_all(params: dict, cfg: ModelConfig, ds, *, batch_size: int = 32, max_new_tokens: int = 8,
               limit: int = 0, progress: bool = False, dist: Dist = LOCAL) -> list[dict]:
    """Greedy answers to every record of ``ds`` (a ``neva.data.NevaDataset`` of held-out questions).
    -> [{"id", "qtype", "question", "answer", "pred", "correct"}]. Under a plan (``dist``, ``params``
    this rank's shard) every rank calls it on the same ``ds`` and gets the same answers."""
    n = len(ds) if not limit else min(limit, len(ds))
    stops = tuple(s for s in ds.stop_strings() if s)
    out = []
    bar = Progress(n, "eval", unit="question", on=progress, leave=False)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        prompts, pix, frames = [], [], []
        for i in idx:
            ids, px = ds.prompt(i)
            prompts.append(ids.tolist())
            pix.append(px)
            frames.append(ds.frame_flags(i, media_count(px)))
        pv = media_cat(pix) if pix else None
        has = media_count(pv) > 0
        res = generate(params, cfg, prompts, pv if has else None,
                       Sampling(max_new_tokens=max_new_tokens, stop_strings=stops), tokenizer=ds.tok, dist=dist,
                       video_frames=torch.cat(frames) if has else None)
        for i, text in zip(idx, res["text"]):
            rec = ds.records[i]
            ref = rec.meta.get("answer", [t.text for t in rec.turns if t.role == "assistant"][-1])
            q = [t.text for t in rec.turns if t.role == "user"][-1].replace("<image>", "").replace("<video>", "").strip()
            pred = normalize(text)
            out.append({"id": rec.id, "qtype": rec.meta.get("qtype", "all"), "question": q, "answer": normalize(ref),
                        "pred": pred, "correct": pred == normalize(ref)})
        bar.update(len(idx))
    bar.close()
    return out


def score(results: list[dict], priors: dict[str, str]) -> dict:
    """{"overall": {"accuracy", "prior", "n"}, "per_type": {qtype: {...}}}; the prior of a question is
    whether its type's most common training answer is its reference answer."""
    def block(rs):
        n = len(rs)
        acc = sum(r["correct"] for r in rs) / n if n else 0.0
        pri = sum(priors.get(r["qtype"]) == r["answer"] for r in rs) / n if n else 0.0
        return {"accuracy": round(acc, 4), "prior": round(pri, 4), "n": n}

    by_type: dict[str, list] = defaultdict(list)
    for r in results:
        by_type[r["qtype"]].append(r)
    return {"overall": block(results), "per_type": {qt: block(rs) for qt, rs in sorted(by_type.items())}}
