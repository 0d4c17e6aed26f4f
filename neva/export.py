"""Export a training checkpoint, whatever layout wrote it, as a Hugging Face LLaVA folder.

    python -m neva.export runs/siglip_mixtral/checkpoints/step_00000500 out/llava [--config CONFIG] [--overwrite]
    python -m neva.export runs/siglip_mixtral out/llava       # the run's newest complete checkpoint

The run's resolved ``config.json`` is found next to the checkpoint (or given with ``--config``);
the checkpoint must hold exactly the tensors that config's model has (a mismatch is an error naming
the missing, unexpected and misshapen leaves, never a half-random model). The output folder must be
empty or new; ``--overwrite`` replaces the files export writes (config.json, the ``model*.safetensors``
weights and their index, the tokenizer, processor, chat template and generation config) and keeps
everything else there. The folder is complete (``neva/hf/folder.py``): ``AutoProcessor`` and its chat
template prompt the model as training did, and vLLM / SGLang serve it.
The checkpoint is read in one process (DCP reassembles every rank's slices); leaves it left out
because they were frozen are rebuilt from the recorded base (HF folders or the init seed) and
checked against its content hash; fp32 master weights are used where the run kept them (bf16_o2);
LoRA is merged. transformers' ``LlavaForConditionalGeneration.from_pretrained(out)`` then gives the
logits neva gives.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch.distributed.checkpoint as dcp

from neva import cli
from neva import experiment as X
from neva import model
from neva.config import ModelConfig
from neva.params import flatten, unflatten


def base_params(exp: X.Experiment) -> tuple[ModelConfig, dict]:
    """The params a run starts from: HF weights (``model.*.from_pretrained``, with the image token
    appended to the vocabulary if the config asks for one past it) or the seeded init; LoRA leaves
    added when ``train.lora`` is set. The main job and ``export`` share it."""
    from neva.train import lora as lora_mod
    cfg = exp.model
    if cfg.vision.from_pretrained or cfg.llm.from_pretrained:
        if not (cfg.vision.from_pretrained and cfg.llm.from_pretrained):
            raise X.ConfigError("set both model.vision.from_pretrained and model.llm.from_pretrained (or neither)")
        from neva import hf
        from neva.hf.vocab import add_image_token
        loaded, params = hf.load_parts(cfg.vision.from_pretrained, cfg.llm.from_pretrained, cfg.projector.kind,
                                       seed=exp.train.seed, select_layer=cfg.vision.select_layer,
                                       select_feature=cfg.vision.select_feature)
        if loaded.image_token_id >= loaded.llm.vocab_size or cfg.llm.vocab_size > loaded.llm.vocab_size:
            loaded, params = add_image_token(loaded, params)
        cfg = replace(loaded, llm=replace(loaded.llm, from_pretrained=cfg.llm.from_pretrained),
                      vision=replace(loaded.vision, from_pretrained=cfg.vision.from_pretrained))
    else:
        params = model.init_params(cfg, seed=exp.train.seed)
    if exp.train.lora:
        params = lora_mod.add(params, lora_mod.LoraConfig(exp.train.lora, exp.train.lora_rank, exp.train.lora_alpha,
                                                          exp.train.seed))
    return cfg, params


def sources(exp: X.Experiment) -> dict:
    """Where a run's base weights come from, for checkpoints (``checkpoint.frozen_info``)."""
    v, l = exp.model.vision.from_pretrained, exp.model.llm.from_pretrained
    init = f"init seed {exp.train.seed}"
    return {"vision": v or init, "llm": l or init, "projector": init}


def find_config(ckpt: Path) -> Path:
    for d in [ckpt, *ckpt.parents][:4]:
        if (d / "config.json").exists():
            return d / "config.json"
    raise FileNotFoundError(f"no config.json next to {ckpt} or in the 3 folders above it: pass --config "
                            "(the run's resolved config, written to run.dir/config.json)")


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint folder (``step_N`` or one with a manifest); for a run folder or
    its ``checkpoints/`` folder, the newest complete checkpoint of the main stage in it (saying which).
    Anything else is an error that says which folder to pass and lists the checkpoints it found."""
    from neva.train import checkpoint as ckpt
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder (run.dir) or one of its "
                                "checkpoints/step_N folders")
    if (path / ckpt.MANIFEST).exists() or path.name.startswith("step_"):
        return path
    for folder in (path / "checkpoints", path):
        newest = ckpt.latest(folder)
        if newest is not None:
            print(f"exporting the newest complete checkpoint in {folder}: {newest.name} "
                  f"(complete: {', '.join(d.name for d in ckpt.complete(folder))})")
            return newest
    found = sorted(d for d in path.rglob("step_*") if d.is_dir())
    listing = "\n  ".join(f"{d}  ({'complete' if d in ckpt.complete(d.parent) else 'incomplete or damaged'})"
                          for d in found) or "(none)"
    raise FileNotFoundError(f"{path} holds no complete checkpoint of a run's main stage: pass a checkpoint "
                            f"folder (RUN_DIR/checkpoints/step_N, or RUN_DIR itself to take the newest). "
                            f"Checkpoint folders under {path}:\n  {listing}")


def load_checkpoint_params(path: Path, exp: X.Experiment) -> tuple[ModelConfig, dict]:
    """Full fp32 params of a checkpoint (any layout), frozen leaves rebuilt and verified, LoRA merged."""
    from neva.train import checkpoint as ckpt
    from neva.train import lora as lora_mod
    man = ckpt.check_complete(path, verify=True)
    cfg, base = base_params(exp)
    if man.get("frozen"):
        now = ckpt.frozen_info(base, [p for p in flatten(base) if p not in set(man["frozen"]["paths"])], {})
        if now is None or now["hash"] != man["frozen"]["hash"]:
            raise ckpt.CheckpointError(
                f"checkpoint {path} left out its frozen leaves; rebuilding them from {man['frozen']['sources']} "
                "gave different values: is the same base (HF folder, seed) still there?")
    params = ckpt.load_params(path, base)
    have = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    masters = {p: v.float().clone() for p, v in flatten(params).items() if f"optim/master/{p}" in have}
    if masters:                                       # bf16_o2: the fp32 masters are the real weights
        sd = {f"optim/master/{p}": v for p, v in masters.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(sd, checkpoint_id=str(path))
        params = unflatten({**{p: v.float() for p, v in flatten(params).items()},
                            **{k[len("optim/master/"):]: v for k, v in sd.items()}})
    else:
        params = unflatten({p: v.float() for p, v in flatten(params).items()})
    if exp.train.lora:
        params = lora_mod.merge(params, exp.train.lora_alpha / exp.train.lora_rank)
    return cfg, params


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite``, before anything is read."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give export a folder to write")
    there = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if there and not overwrite:
        raise FileExistsError(
            f"{out} is not empty ({', '.join(there[:5])}{' ...' if len(there) > 5 else ''}): choose a new folder, "
            "or pass --overwrite to replace the files export writes (config.json, model*.safetensors, tokenizer "
            "files) and keep the others")


def export(ckpt_path: str | Path, out: str | Path, config: str | Path | None = None, overwrite: bool = False) -> Path:
    from neva import hf
    ckpt_path = find_checkpoint(ckpt_path)
    check_out(Path(out), overwrite)
    exp = X.load(config or find_config(ckpt_path))
    cfg, params = load_checkpoint_params(ckpt_path, exp)
    tok = None
    if exp.data is not None and exp.data.tokenizer:
        from neva.data import tokenizers
        try:
            tok = tokenizers.load(exp.data.tokenizer)
        except Exception as e:  # noqa: BLE001 - the weights are still written; say why the rest is not
            print(f"note: tokenizer {exp.data.tokenizer!r} could not be loaded ({e}): writing the weights and "
                  f"config.json only; copy a tokenizer into {out} yourself")
    hf.save(params, cfg, str(out), data=exp.data if tok is not None else None, tokenizer=tok)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m neva.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint folder (RUN_DIR/checkpoints/step_N), or a run folder "
                                       "(RUN_DIR: its newest complete checkpoint)")
    ap.add_argument("out", help="the HF LLaVA folder to write")
    ap.add_argument("--config", help="the run's config.json (default: found next to the checkpoint)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty folder, replacing only the files export writes")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    try:
        out = export(a.checkpoint, a.out, a.config, overwrite=a.overwrite)
    except cli.USER_ERRORS as e:
        if a.debug or cli.debug([])[0]:
            raise
        cli.report(e)
        return 2
    print(f"wrote {out}: load it with transformers' LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
