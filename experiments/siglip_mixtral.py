"""The main job: a small SigLIP + mlp2x_gelu + Mixtral (8 experts, top-2) NeVA learns, from scratch on
one CPU in under 10 minutes, to answer questions about synthetic images and video clips.

    python experiments/siglip_mixtral.py                                  # the default run
    python experiments/siglip_mixtral.py train.seed=1 run.dir=runs/seed1  # any field: key=value
    python experiments/siglip_mixtral.py --help [SECTION]                 # every key: value, type, what it does
    python experiments/siglip_mixtral.py --recipe llava \\
        model.vision.from_pretrained=/models/siglip model.llm.from_pretrained=/models/mixtral

What it does: writes the synthetic shapes/motion dataset to ``data/synthetic`` if absent; tokenises
with the real 32k Mixtral tokenizer (shipped by mistral-common) and the ``mistral`` template;
optionally aligns on captions first (``train.pretrain_steps``); trains on image questions (colour,
shape, count, position, yes/no) and video questions (motion); answers the held-out questions by
greedy generation. Under ``run.dir`` (default ``runs/siglip_mixtral``): ``config.json``,
``metrics.jsonl`` (a row per step), ``metrics.json`` (held-out exact-match accuracy and the prior,
overall and per question type, images and video), ``tb/`` (TensorBoard), ``loss_curve.png``,
``checkpoints/`` (resume with the same command), ``hf/`` (a LLaVA folder transformers loads) and
``samples.jsonl`` (every held-out answer).

``--recipe llava``: LLaVA's two stages from real weights: projector pretraining on captions with
the encoder and LLM frozen, then fine-tuning of projector + LLM on the questions.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import torch

from neva import cli, comm
from neva import experiment as X
from neva import model
from neva.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from neva.data import DataConfig, build_loader
from neva.data import synthetic, tokenizers
from neva.export import base_params, sources
from neva.params import flatten
from neva.parallel import runtime
from neva.train import lora, loop, precision, qa_eval, report
from neva.train.threads import pick_threads

DATA = "data/synthetic"


def model_config() -> ModelConfig:
    """32 px images in 8 px patches (16 tokens each) through a 2-layer SigLIP; a 4-layer Mixtral with
    8 experts (top-2) over the real 32k vocabulary (+ the image token, padded to a multiple of 64)."""
    vision = VisionConfig(kind="siglip", image_size=32, patch_size=8, dim=96, n_layers=2, n_heads=4, mlp_dim=384,
                          select_layer=-1, eps=1e-6, act="gelu_tanh")
    llm = LLMConfig(kind="mixtral", vocab_size=32064, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                    rope_theta=1e6, max_position=1024, n_experts=8, top_k=2, aux_loss_coef=0.02, init_std=0.02,
                    bos_id=1, eos_id=2)
    return ModelConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu"), llm=llm, image_token_id=32000)


def base() -> X.Experiment:
    data = DataConfig(data_path=f"{DATA}/train.jsonl,{DATA}/captions.jsonl,{DATA}/video_train.jsonl",
                      eval_path=f"{DATA}/eval.jsonl,{DATA}/video_eval.jsonl", video_folder=f"{DATA}/videos.tar",
                      tokenizer="mixtral", template="mistral",
                      num_frames=4, max_seq_len=192, batch_size=32, num_workers=1)
    train = X.TrainConfig(steps=600, lr=1e-3, warmup=30, min_lr_ratio=0.05, weight_decay=0.0, betas=(0.9, 0.98),
                          clip=1.0, precision="auto", pretrain_steps=0, pretrain_data=f"{DATA}/captions.jsonl")
    return X.Experiment(model=model_config(), data=data, train=train, eval=X.EvalConfig(batch_size=50, max_new_tokens=6),
                        checkpoint=X.CheckpointConfig(every=100, keep_last=1),
                        run=X.RunConfig(dir="runs/siglip_mixtral"))


def llava_recipe(exp: X.Experiment) -> X.Experiment:
    """LLaVA's stages: projector pretraining on captions (encoder and LLM frozen), then projector + LLM."""
    v, l = exp.model.vision.from_pretrained, exp.model.llm.from_pretrained
    if not (v and l):
        raise X.ConfigError("--recipe llava needs model.vision.from_pretrained=FOLDER (CLIP or SigLIP) and "
                            "model.llm.from_pretrained=FOLDER (Llama / Mistral / Mixtral) on the command line")
    t = replace(exp.train, pretrain_steps=exp.train.pretrain_steps or 200, pretrain_lr=exp.train.pretrain_lr or 1e-3,
                pretrain_freeze=exp.train.pretrain_freeze or r"^(vision|llm)/", freeze=exp.train.freeze or r"^vision/",
                lr=2e-5 if exp.train.lr == base().train.lr else exp.train.lr)
    data = exp.data if exp.data.tokenizer != "mixtral" else replace(exp.data, tokenizer=l)
    return replace(exp, train=t, data=data)


RECIPES = {"scratch": "(default) this small NeVA from random init on the synthetic shapes and clips",
           "llava": "LLaVA's two stages from HF folders (model.vision.from_pretrained and "
                    "model.llm.from_pretrained): projector pretraining on captions with the encoder and LLM "
                    "frozen, then projector + LLM on the questions"}
USAGE = ("usage: python experiments/siglip_mixtral.py [--recipe RECIPE] [key=value ...] [--help [SECTION]]\n\n"
         + "\n".join(textwrap.fill(v, 104, initial_indent=f"  --recipe {k:8s} ", subsequent_indent=" " * 20)
                     for k, v in RECIPES.items()))


def split_recipe(argv: list[str]) -> tuple[str, list[str]]:
    if "--recipe" in argv:
        i = argv.index("--recipe")
        if i + 1 >= len(argv) or argv[i + 1] not in RECIPES:
            raise SystemExit(f"--recipe takes one of {', '.join(RECIPES)}\n\n{USAGE}")
        return argv[i + 1], argv[:i] + argv[i + 2:]
    return "scratch", argv


GENERATE = dict(seed=0, train_images=3000, eval_images=100, qa_per_image=5, train_videos=300, eval_videos=60,
                frames=8, size=32, jitter=1)   # all five question types per image; shapes centred within 1 px


def ensure_data(exp: X.Experiment) -> None:
    """(Re)generate the synthetic dataset if the job's files are asked for and absent, or were written
    with other settings (``DATA/job.json`` records them)."""
    wanted = [p for p in exp.data.data_path.split(",") + [exp.train.pretrain_data] if p]
    if not any(p.startswith(DATA) for p in wanted):
        return
    marker = Path(DATA) / "job.json"
    if marker.exists() and json.loads(marker.read_text()) == GENERATE and all(Path(p).exists() for p in wanted):
        return
    print(f"writing the synthetic dataset to {DATA}/ ...")
    counts = synthetic.generate(DATA, progress=exp.run.progress, **GENERATE)
    marker.write_text(json.dumps(GENERATE))
    print("  " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def check_export(exp: X.Experiment) -> None:
    """An HF export that cannot happen is an error now, not after training."""
    if exp.checkpoint.export_hf:
        from neva.hf.folder import image_processor
        from neva.hf.translate import llava_json
        try:
            llava_json(exp.model, "float32")
            image_processor(exp.model, exp.data.image_mode)
        except ValueError as e:
            raise X.ConfigError(str(e)) from None


def main(argv: list[str], base_exp: X.Experiment | None = None, ensure=None) -> dict:
    """The job on ``base_exp`` (default ``base()``) with the command line's overrides. Another experiment
    reuses it with its own ``base_exp`` and ``ensure(exp)`` (writes its data when absent), e.g.
    ``experiments/long_video.py``."""
    t_start = time.time()
    recipe, argv = split_recipe(argv)
    base_exp = base_exp or base()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    exp = X.parse(argv, base_exp, world_size=world, usage=USAGE)
    if recipe == "llava":
        exp = X.validate(llava_recipe(exp))
    check_export(exp)
    threads, why_threads = pick_threads(exp.run.threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":   # one writer per node
        (ensure or ensure_data)(exp)
    torch.manual_seed(exp.train.seed)
    cfg, params = base_params(exp)                 # full on every rank; big HF models: par.hf_slices
    exp = replace(exp, model=cfg)
    pc, t = exp.parallel, exp.train
    specs = model.specs(cfg)                       # what the plan places: the model, and LoRA factors if any
    if t.lora:
        specs = lora.specs(specs, lora.LoraConfig(t.lora, t.lora_rank, t.lora_alpha, t.seed))
    par = runtime.setup(cfg, pc.tp, pc.pp, pc.ep, pc.sp, schedule=pc.pp_schedule, zero1=pc.zero1, specs=specs,
                        cp=pc.cp, vision=pc.vision)
    if not par.single:
        torch.distributed.barrier()                # rank 0 may have been writing the dataset
    say = print if par.main else (lambda *a, **k: None)
    run_dir = Path(exp.run.dir)
    tok = tokenizers.load(exp.data.tokenizer)
    say(f"model: {report.describe_model(cfg, params)}")
    say(f"threads: {why_threads}")
    say(f"precision: {precision.resolve(exp.train.precision)[1]}")
    if not par.single:
        say(par.plan.summary(cfg, par.specs))
        if pc.zero1 and par.layout.dp > 1:
            say(f"ZeRO-1: the optimizer state of each leaf on one of the {par.layout.dp} dp ranks")
    eval_sets = report.eval_sets(exp, cfg, tok)
    priors: dict = {}                              # the main stage's most common answer per question type
    loaders = []

    def batches_for(stage: loop.Stage):
        try:
            loader = build_loader(stage.exp.data, cfg, tok=tok, progress=exp.run.progress and par.main,
                                  rank=par.dist.data_rank, world=par.dist.data_size)
        except ValueError as e:              # stage 1 reads what train.pretrain_* say, not data.*
            if not stage.tag:
                raise
            raise type(e)(f"stage 1 (train.pretrain_data={stage.exp.data.data_path}, train.pretrain_template="
                          f"{stage.exp.data.template}): {e}") from e
        if not stage.tag:
            priors.update(qa_eval.prior_answers(qa_eval.training_answers(loader.ds.records)))
        loaders.append(loader)
        return loader

    def eval_fn(p: dict, step: int) -> dict:      # every rank generates with its shard; the row is rank 0's
        return report.eval_rows(p, cfg, eval_sets, priors, exp, limit=exp.eval.max_samples or 200, par=par)

    from_hf = exp.model.vision.from_pretrained or exp.model.llm.from_pretrained
    res = loop.run(exp, params, batches_for, par=par, eval_fn=eval_fn, sources=sources(exp) if from_hf else None)
    plain = loop.plain_params(exp, res.state)
    final = par.gather(plain)                      # for the export, on rank 0
    skipped = skipped_samples(loaders, par)
    t_train = time.time() - t_start
    metrics = report.final_eval(plain, cfg, eval_sets, priors, exp, par=par)   # under the plan, as during training
    if not par.main:
        return {}
    metrics.update(recipe=recipe, seed=t.seed, steps=t.steps, pretrain_steps=t.pretrain_steps,
                   train_seconds=round(t_train, 1), precision=precision.resolve(t.precision)[0],
                   params=sum(v.numel() for v in flatten(final).values()),
                   skipped_samples=skipped, skipped_steps=res.skipped_steps)
    if exp.checkpoint.export_hf:
        from neva import hf
        hf.save(final, cfg, str(run_dir / "hf"), data=exp.data, tokenizer=tok)   # weights + what serving needs
    report.plot(run_dir)
    segment = {"steps": len(res.rows), "train_seconds": metrics.pop("train_seconds"),
               "wall_seconds": round(time.time() - t_start, 1), "threads": threads,
               "resumed_from": str(res.resumed_from) if res.resumed_from else None,
               "ended": time.strftime("%Y-%m-%d %H:%M:%S")}
    metrics = report.save_metrics(run_dir, metrics, segment, resumed=res.resumed_from is not None)
    report.print_summary(metrics, run_dir)
    return metrics


def skipped_samples(loaders: list, par) -> int:
    """Samples left out under data.on_bad_sample=skip, over every stage: those the scan dropped (every
    rank scans them all) and those that failed to load (each data rank loads its own)."""
    loaded = torch.tensor(float(sum(len(ld.skipped) for ld in loaders)))
    loaded = comm.all_reduce_nograd(loaded, par.dist.data, "sum")
    return sum(len(ld.ds.stats.skipped) for ld in loaders) + int(loaded)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])      # a user's error: one line (--debug: the traceback); the last good state is saved
