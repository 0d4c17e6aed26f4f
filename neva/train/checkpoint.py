"""Checkpoints for resume, written with ``torch.distributed.checkpoint`` (DCP).

One flat state dict, path -> tensor, so saving sharded and loading under another layout only changes
how each tensor is wrapped (issue 6), never the format:

  params/<leaf path>          the params tree (policy dtype)
  optim/m/<path>, optim/v/<path>, optim/master/<path>   AdamW moments and fp32 masters
  rng/torch                   torch's CPU generator state
  meta                        JSON: step, optimizer step, skip counters, loss scaler, sampler state,
                              Python RNG state, anything the caller adds

Atomic: everything goes to ``<dir>/.tmp-step_N``, then ``manifest.json`` (file names and sizes) is
written last and the folder renamed to ``<dir>/step_N``. A folder without a manifest, or whose files
disagree with it, is incomplete: ``latest`` skips it, ``load`` refuses it with a clear error.
DCP needs no process group in a single process; under torchrun every rank writes its shards into
the same temporary folder and rank 0 finishes it after a barrier.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp

from neva.params import flatten, unflatten
from neva.train.step import TrainState

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _rank0() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def to_state_dict(state: TrainState, meta: dict | None = None) -> dict:
    """The flat DCP state dict of a training state (tensors are shared, not copied)."""
    sd = {f"params/{p}": v for p, v in flatten(state.params).items()}
    for part in ("m", "v", "master"):
        for p, v in state.opt_state.get(part, {}).items():
            sd[f"optim/{part}/{p}"] = v
    sd["rng/torch"] = torch.get_rng_state()
    m = {"opt_step": state.opt_state["step"], "skipped": state.skipped, "bad_in_row": state.bad_in_row,
         "scaler": state.scaler.state_dict() if state.scaler else None,
         "python_rng": _py_rng_to_json(random.getstate()), **(meta or {})}
    sd["meta"] = json.dumps(m)
    return sd


def _py_rng_to_json(st) -> list:
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st) -> tuple:
    return (st[0], tuple(st[1]), st[2])


def save(ckpt_dir: str | Path, step: int, state: TrainState, meta: dict | None = None,
         keep_last: int = 0) -> Path:
    """Write ``step_<step>`` atomically under ``ckpt_dir``; keep the newest ``keep_last`` (0 = all)."""
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".tmp-step_{step:08d}"
    if _rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)          # leftovers of a crash mid-write
        tmp.mkdir()
    _barrier()
    sd = to_state_dict(state, dict(meta or {}, step=step))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(sd, checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        man = {"step": step, "time": time.time(), "files": files, "keys": len(sd)}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(man, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():                               # re-saving a step: the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in complete(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_complete(path: Path) -> dict:
    """The manifest of a complete checkpoint; raise CheckpointError naming what is wrong."""
    man_path = path / MANIFEST
    if not man_path.exists():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it was interrupted while being written "
                              "(use an older one, or train.resume=auto to pick the newest complete one)")
    try:
        man = json.loads(man_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({e})") from None
    for name, size in man["files"].items():
        f = path / name
        if not f.exists() or f.stat().st_size != size:
            got = f.stat().st_size if f.exists() else "missing"
            raise CheckpointError(f"checkpoint {path}: file {name} is {got}, the manifest says {size} bytes; "
                                  "the checkpoint is damaged: resume from an older one")
    return man


def complete(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            try:
                check_complete(d)
            except CheckpointError:
                continue
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest(ckpt_dir: str | Path) -> Path | None:
    c = complete(ckpt_dir)
    return c[-1] if c else None


def resolve(resume: str | None, ckpt_dir: str | Path) -> Path | None:
    """``train.resume``: "" / None / "none" = fresh start; "auto" = newest complete checkpoint under
    ``ckpt_dir`` (or None); anything else is a checkpoint folder that must exist and be complete."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return latest(ckpt_dir)
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint folder")
    check_complete(p)
    return p


def load(path: str | Path, state: TrainState) -> dict:
    """Load a checkpoint in place into ``state`` (params, optimizer, counters, scaler, RNG states).
    Returns the meta dict (with "step" and whatever the caller saved, e.g. "sampler")."""
    path = Path(path)
    check_complete(path)
    sd = to_state_dict(state)
    sd["meta"] = ""
    have = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in sd if k not in have]
    extra = [k for k in have if k not in sd]
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimizer: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}; "
            "was it written with another model config, precision or set of frozen parameters?")
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and tuple(have[k].size) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {path}: {k} has shape {tuple(have[k].size)}, "
                                  f"this run expects {tuple(v.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(sd, checkpoint_id=str(path))
    meta = json.loads(sd["meta"])
    torch.set_rng_state(sd["rng/torch"])
    random.setstate(_py_rng_from_json(meta["python_rng"]))
    state.opt_state["step"] = meta["opt_step"]
    state.skipped, state.bad_in_row = meta["skipped"], meta["bad_in_row"]
    if state.scaler is not None and meta.get("scaler"):
        state.scaler.load_state_dict(meta["scaler"])
    return meta


def load_params(path: str | Path, params: dict) -> dict:
    """Only the params of a checkpoint, into a tree shaped like ``params`` (export, evaluation)."""
    path = Path(path)
    check_complete(path)
    sd = {f"params/{p}": v.clone() for p, v in flatten(params).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(sd, checkpoint_id=str(path))
    return unflatten({k[len("params/"):]: v for k, v in sd.items()})
