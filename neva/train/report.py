"""What an experiment shows its user: held-out evaluation by modality, the loss-curve PNG, a summary."""
from __future__ import annotations

import json
from pathlib import Path


from neva.config import ModelConfig
from neva.params import count
from neva.train import qa_eval


def describe_model(cfg: ModelConfig, params: dict) -> str:
    v, l = cfg.vision, cfg.llm
    moe = f", {l.n_experts} experts top-{l.top_k}" if l.n_experts else ""
    vit = " + ".join(f"{t.kind} {t.n_layers}x{t.dim} ({t.image_size}px / {t.patch_size}px patches)" for t in v.parts)
    return (f"{vit + ' fused' if v.towers else vit} = {cfg.tokens_per_image} tokens per image "
            f"-> {cfg.projector.kind} -> {l.kind} {l.n_layers}x{l.dim}{moe}, vocab {l.vocab_size}; "
            f"{count(params) / 1e6:.2f}M parameters ({count(params['llm']['embed']) / 1e6:.2f}M in the embedding)")


def eval_sets(exp, cfg: ModelConfig, tok) -> dict:
    """modality ("image" | "video") -> held-out NevaDataset, one per file of ``data.eval_path``."""
    from neva.data import NevaDataset

    out: dict = {}
    for path in filter(None, (p.strip() for p in (exp.data.eval_path or "").split(","))):
        ds = NevaDataset(exp.data, cfg, data_path=path, tok=tok)
        kind = "video" if any(r.videos for r in ds.records) else "image"
        if kind in out:
            raise ValueError(f"data.eval_path lists two {kind} files; give one file per modality")
        out[kind] = ds
    return out


def eval_rows(params: dict, cfg: ModelConfig, sets: dict, priors: dict, exp, limit: int) -> dict:
    """Accuracy on the first ``limit`` questions of each set, for a metrics row during training."""
    row = {}
    for kind, ds in sets.items():
        res = qa_eval.answer_all(params, cfg, ds, batch_size=exp.eval.batch_size,
                                 max_new_tokens=exp.eval.max_new_tokens, limit=limit)
        sc = qa_eval.score(res, priors)
        row[f"eval/{kind}_acc"] = sc["overall"]["accuracy"]
        for qt, b in sc["per_type"].items():
            row[f"eval/{kind}_{qt}_acc"] = b["accuracy"]
    return row


def final_eval(params: dict, cfg: ModelConfig, sets: dict, priors: dict, exp) -> dict:
    """Every held-out question: metrics.json's body, samples.jsonl, and a few answers printed."""
    run_dir = Path(exp.run.dir)
    out: dict = {"priors": priors}
    samples = []
    for kind, ds in sets.items():
        res = qa_eval.answer_all(params, cfg, ds, batch_size=exp.eval.batch_size,
                                 max_new_tokens=exp.eval.max_new_tokens, limit=exp.eval.max_samples,
                                 progress=exp.run.progress)
        out[kind] = qa_eval.score(res, priors)
        samples += [dict(r, modality=kind) for r in res]
        shown = _spread(res, exp.eval.show)
        if shown:
            print(f"held-out {kind} questions:")
            for r in shown:
                mark = "ok " if r["correct"] else "NO "
                print(f"  {mark} [{r['qtype']}] {r['question']}  -> {r['pred']!r} (answer {r['answer']!r})")
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return out


def _spread(res: list[dict], n: int) -> list[dict]:
    """Up to ``n`` results, one per question type in turn."""
    by: dict[str, list] = {}
    for r in res:
        by.setdefault(r["qtype"], []).append(r)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by.values()):
        out += [v[i] for v in by.values() if i < len(v)][: n - len(out)]
        i += 1
    return out


def plot(run_dir: str | Path) -> Path | None:
    """loss_curve.png: training loss per step (and held-out accuracy when it was measured)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neva.train.metrics import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig = loss_figure(rows, Path(run_dir).name)
    path = Path(run_dir) / "loss_curve.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_figure(rows: list[dict], title: str, k: int = 20):
    """The loss curve of metrics rows: raw and its running mean of ``k`` on a log axis whose ticks
    (1, 2, 3, 5 per decade) carry numbers; the axis label gives the final running mean."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    if len(rows) > k:
        ax.plot(steps, smooth, lw=1.6, label=f"loss (mean of {k})")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", axis="y", lw=0.4, alpha=0.5)
    pre = [r["step"] for r in rows if any(key.startswith("pretrain/") for key in r)]
    if pre:
        ax.axvline(max(pre) + 0.5, color="grey", ls="--", lw=0.8)
        ax.text(max(pre), ax.get_ylim()[1] * 0.95, " captions | questions", fontsize=8, va="top", ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (last {min(k, len(rows))} steps: mean {smooth[-1]:.3f})")
    acc = [(r["step"], r["eval/image_acc"]) for r in rows if "eval/image_acc" in r]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "o-", color="tab:green", label="held-out image accuracy")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(title)
    return fig


def save_metrics(run_dir: str | Path, metrics: dict, segment: dict, resumed: bool) -> dict:
    """Write metrics.json: ``metrics`` (the evaluation of the final model), the run's history in
    ``segments`` (one per command that trained it: ``segment``'s steps and seconds), and
    ``train_seconds`` / ``wall_seconds`` summed over them. A run that ``resumed`` keeps the segments
    of the metrics.json already there; a fresh one starts the history again. -> what was written."""
    path = Path(run_dir) / "metrics.json"
    history: list = []
    if resumed and path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        history = old.get("segments") or (                   # written before segments were recorded
            [{k: old[k] for k in ("steps", "train_seconds", "wall_seconds") if k in old}] if old else [])
    history.append(segment)
    out = dict(metrics, segments=history)
    for key in ("train_seconds", "wall_seconds"):
        out[key] = round(sum(s.get(key, 0.0) for s in history), 1)
    path.write_text(json.dumps(out, indent=1))
    return out


OUTPUTS = ("metrics.json", "metrics.jsonl", "loss_curve.png", "tb/", "checkpoints/", "hf/", "samples.jsonl")


def print_summary(m: dict, run_dir: str | Path) -> None:
    print("\nheld-out exact-match accuracy (prior = always the most common training answer of the type):")
    for kind in ("image", "video"):
        if kind not in m:
            continue
        o = m[kind]["overall"]
        print(f"  {kind:5s} overall  {o['accuracy']:.3f}  (prior {o['prior']:.3f}, n={o['n']})")
        for qt, b in m[kind]["per_type"].items():
            print(f"        {qt:9s} {b['accuracy']:.3f}  (prior {b['prior']:.3f}, n={b['n']})")
    if "skipped_samples" in m or "skipped_steps" in m:
        print(f"  skipped: {m.get('skipped_samples', 0)} samples that could not be used (data.on_bad_sample=skip), "
              f"{m.get('skipped_steps', 0)} steps with a non-finite loss")
    segs = m.get("segments", [])
    took = f"{segs[-1]['wall_seconds']:.0f}s" if segs else f"{m['wall_seconds']:.0f}s"
    if len(segs) > 1:
        took += f" ({m['wall_seconds']:.0f}s over the {len(segs)} commands that made this run)"
    written = [name for name in OUTPUTS if (Path(run_dir) / name.rstrip("/")).exists()]
    print(f"done in {took}; outputs in {run_dir}/ ({', '.join(written)})")
