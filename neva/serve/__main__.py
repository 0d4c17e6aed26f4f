"""``python -m neva.serve MODEL``: serve a model over the OpenAI chat API.

    python -m neva.serve runs/siglip_mixtral/hf                 # an HF LLaVA folder (ours, or any)
    python -m neva.serve runs/siglip_mixtral --port 8000        # a run folder: its newest checkpoint
    python -m neva.serve runs/siglip_mixtral/checkpoints/step_00000600 --dtype float32

MODEL is an HF LLaVA folder (``config.json`` with ``model_type: llava``), a run folder, or one of its
checkpoints (read in one process, as ``neva.export`` reads it). ``--dtype float16`` (the default, as
NeVA's inference) runs in half precision on the CPU too (PyTorch's CPU kernels take fp16; slower than
bfloat16 on CPUs without fp16 arithmetic, and the answers can differ from float32's in the last
digits); float32 reproduces the evaluation's answers exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from neva import cli
from neva.data.config import DataConfig
from neva.params import flatten, unflatten
from neva.serve import engine as E
from neva.serve.api import app
from neva.serve.prompts import Prompter

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _record_data(rec: dict) -> DataConfig:
    """config.json's ``neva`` record (``neva/hf/folder.py``) -> the DataConfig fields that prompt."""
    return DataConfig(template=rec["template"], system_prompt=rec.get("system_prompt"),
                      image_mode=rec.get("image_mode", "square"), num_frames=rec.get("num_frames", 4),
                      splice_single_frame=rec.get("splice_single_frame"))


def load(path: str, dtype: torch.dtype):
    """MODEL -> (ModelConfig, params in ``dtype``, tokenizer, DataConfig or None, chat template or None)."""
    from neva.data import tokenizers
    p = Path(path)
    conf = p / "config.json"
    if conf.is_file() and json.loads(conf.read_text()).get("model_type") == "llava":
        from neva import hf
        cfg, params = hf.load(str(p), dtype=dtype)
        rec = json.loads(conf.read_text()).get("neva")
        tok = tokenizers.load(str(p))
        return cfg, params, tok, _record_data(rec) if rec else None, None if rec else tok.chat_template
    from neva import experiment as X
    from neva import export
    ckpt = export.find_checkpoint(p)
    exp = X.load(export.find_config(ckpt))
    cfg, params = export.load_checkpoint_params(ckpt, exp)
    params = unflatten({k: v.to(dtype) for k, v in flatten(params).items()})
    return cfg, params, tokenizers.load(exp.data.tokenizer), exp.data, None


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m neva.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an HF LLaVA folder, a run folder, or a checkpoint folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--served-model-name", help="the model name clients send (default: MODEL's folder name)")
    ap.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429")
    ap.add_argument("--max-prompt-tokens", type=int, help="longer prompts get 400 (default: the model's positions)")
    ap.add_argument("--max-media-per-prompt", type=int, default=8, help="images and videos per request")
    ap.add_argument("--allowed-local-media-path", help="image_url / video_url may name files under this folder")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a, rest = ap.parse_known_args(argv)
    bad = [x for x in rest if "=" not in x]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    return a, rest


def plan(params: dict, cfg, tok, overrides: list[str]):
    """Under torchrun: the ``Parallel`` of ``parallel.*`` overrides (tp, ep and their sp; dp is the
    rest of the world, each dp rank generating the same batch) and this rank's shard -> (par, local
    params, this rank's ``GenerateFn``: rank 0's broadcasts each batch with ``neva.generate.on_plan``)."""
    from neva import generate as gen
    from neva import overrides as O
    from neva.parallel import runtime
    from neva.parallel.config import ParallelConfig
    unknown = [o for o in overrides if not o.startswith("parallel.")]
    if unknown:
        raise ValueError(f"unknown overrides {unknown}: python -m neva.serve takes parallel.* overrides only")
    pc = O.override(ParallelConfig(), [o[len("parallel."):] for o in overrides])
    if pc.pp > 1 or pc.cp > 1:
        raise ValueError("generation under parallel.pp or parallel.cp is not wired: serve with parallel.tp and "
                         "parallel.ep (and sp)")
    par = runtime.setup(cfg, pc.tp, 1, pc.ep, pc.sp, vision=pc.vision)
    local = par.shard(params)

    def fn(prompts, pixel_values, sampling, on_token=None) -> dict:
        return gen.on_plan(par, local, prompts, pixel_values, sampling, tok, on_token=on_token)
    return par, local, fn


def main(argv: list[str] | None = None) -> int:
    a, overrides = parse(sys.argv[1:] if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    par = None
    try:
        if a.threads:
            torch.set_num_threads(a.threads)
        dtype = DTYPES[a.dtype]
        cfg, params, tok, data, template = load(a.model, dtype)
        if world > 1:
            par, local, fn = plan(params, cfg, tok, overrides)
            if rank > 0:                                # take part in rank 0's batches until it releases
                from neva import generate as gen
                try:
                    gen.follow(par, local, tok)
                except KeyboardInterrupt:
                    pass
                return 0
        elif overrides:
            raise ValueError(f"{' '.join(overrides)}: parallel.* overrides need torchrun (torchrun "
                             f"--nproc_per_node N -m neva.serve MODEL parallel.tp=N)")
        else:
            fn = E.local(params, cfg, tok)
        root = Path(a.allowed_local_media_path).resolve() if a.allowed_local_media_path else None
        prompter = Prompter(cfg, tok, data, template, root, a.max_media_per_prompt, a.max_prompt_tokens)
        from neva.data import templates
        end = templates.get(data.template).end(tok.eos_token or "") if data else ""
        end = "" if end == tok.eos_token else end       # EOS stops by its id; a stop string costs a decode a step
        engine = E.Engine(fn, tok, eos_id=cfg.llm.eos_id, dtype=dtype,
                          max_batch=a.max_batch_size, max_queue=a.max_queue)
    except cli.USER_ERRORS as e:
        _release(par, rank)
        if a.debug:
            raise
        cli.report(e)
        return 2
    import uvicorn
    name = a.served_model_name or Path(a.model).resolve().name
    print(f"serving {name} ({a.dtype}{f', {world} ranks: {par.layout}' if par else ''}) on http://{a.host}:{a.port}/v1",
          flush=True)
    try:
        uvicorn.run(app(engine, prompter, name, end), host=a.host, port=a.port, log_level="warning")
    finally:
        _release(par, rank)
    return 0


def _release(par, rank: int) -> None:
    """Rank 0 stops the followers (they wait in ``neva.generate.follow``)."""
    if par is not None and rank == 0:
        from neva import generate as gen
        try:
            gen.release(par)
        except RuntimeError:                            # a follower already gone (Ctrl-C reaches every rank)
            pass


if __name__ == "__main__":
    sys.exit(main())
