"""Checkpoints for resume, written with ``torch.distributed.checkpoint`` (DCP).

One flat state dict, path -> tensor, so saving sharded and loading under another layout only changes
how each tensor is wrapped (issue 6), never the format:

  params/<leaf path>          the params tree (policy dtype)
  optim/m/<path>, optim/v/<path>, optim/master/<path>   AdamW moments and fp32 masters
  rng/torch                   torch's CPU generator state
  meta                        JSON: step, optimizer step, skip counters, loss scaler, sampler state,
                              Python RNG state, anything the caller adds

Atomic: everything goes to ``<dir>/.tmp-step_N``, then ``manifest.json`` (file names, sizes and
checksums) is written last and the folder renamed to ``<dir>/step_N``. A folder without a manifest,
or whose files disagree with it, is incomplete or damaged: ``latest`` skips it (saying so), ``load``
refuses it with a clear error.

Sharded (issue 6): under a parallel plan (``par``) every tensor is wrapped as a DTensor with the
plan's placements, so each rank writes its own slices and a checkpoint written under one layout loads
under any other, or in one process without a process group; the manifest records the layout.
DCP needs no process group in a single process; under torchrun every rank writes its shards into
the same temporary folder and rank 0 finishes it after a barrier.

Frozen parts: with ``frozen=frozen_info(...)`` the leaves that do not train are left out; the
checkpoint records where they came from (HF folders, or the init seed) and a content hash, and
loading checks that the run rebuilt the same base (a changed or missing base is an error).
"""
from __future__ import annotations

import hashlib
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


def frozen_info(params: dict, trainable: list[str], sources: dict) -> dict | None:
    """What a checkpoint needs to leave the frozen leaves out: their paths, a content hash of their
    full (unsharded) values, and ``sources`` ({"vision": folder or "init seed N", ...}) for people
    and for ``neva.export``. Compute it from the full params, before any sharding. None if all train."""
    flat = flatten(params)
    train = set(trainable)
    frozen = sorted(p for p in flat if p not in train)
    if not frozen:
        return None
    h = hashlib.blake2b(digest_size=16)
    for p in frozen:
        t = flat[p].detach().contiguous()
        h.update(f"{p}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"paths": frozen, "hash": h.hexdigest(), "sources": sources}


def to_state_dict(state: TrainState, meta: dict | None = None, par=None, frozen: dict | None = None) -> dict:
    """The flat DCP state dict of a training state (tensors are shared, not copied): this rank's
    slices as DTensors under a plan (``par``), only the trained leaves if ``frozen`` is given."""
    skip = set(frozen["paths"]) if frozen else set()
    sd = {f"params/{p}": v for p, v in flatten(state.params).items() if p not in skip}
    for part in ("m", "v", "master"):
        for p, v in state.opt_state.get(part, {}).items():
            sd[f"optim/{part}/{p}"] = v
    sd["rng/torch"] = torch.get_rng_state()
    m = {"opt_step": state.opt_state["step"], "skipped": state.skipped, "bad_in_row": state.bad_in_row,
         "scaler": state.scaler.state_dict() if state.scaler else None,
         "python_rng": _py_rng_to_json(random.getstate()), **(meta or {})}
    sd["meta"] = json.dumps(m)
    if par is not None and not par.single:
        from neva.parallel.dtensor import leaf_of, wrap
        sd = wrap(sd, par.placements({leaf_of(k) for k in sd if leaf_of(k)}), par.dist.mesh)
    return sd


def _py_rng_to_json(st) -> list:
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st) -> tuple:
    return (st[0], tuple(st[1]), st[2])


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save(ckpt_dir: str | Path, step: int, state: TrainState, meta: dict | None = None,
         keep_last: int = 0, par=None, frozen: dict | None = None) -> Path:
    """Write ``step_<step>`` atomically under ``ckpt_dir``; keep the newest ``keep_last`` (0 = all).
    Under a plan every rank calls this with its own state (``par``)."""
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".tmp-step_{step:08d}"
    if _rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)          # leftovers of a crash mid-write
        tmp.mkdir()
    _barrier()
    sd = to_state_dict(state, dict(meta or {}, step=step), par=par, frozen=frozen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(sd, checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        sums = {name: _digest(tmp / name) for name in files}
        man = {"step": step, "time": time.time(), "files": files, "blake2b": sums, "keys": len(sd),
               "layout": str(par.layout) if par is not None else "single", "frozen": frozen,
               "tag": (meta or {}).get("tag", "")}
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


def check_complete(path: Path, verify: bool = False) -> dict:
    """The manifest of a complete checkpoint; raise CheckpointError naming what is wrong.
    ``verify``: also compare every file's checksum (reads the whole checkpoint)."""
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
        if verify and name in man.get("blake2b", {}) and _digest(f) != man["blake2b"][name]:
            raise CheckpointError(f"checkpoint {path}: file {name} does not match its checksum: the checkpoint "
                                  "is corrupt: resume from an older one (train.resume=auto skips it)")
    return man


def tag_of(path: str | Path) -> str:
    """The stage a checkpoint belongs to ("pretrain" for a recipe's first stage, "" for the main one)."""
    path = Path(path)
    man = check_complete(path)
    return man.get("tag", "pretrain" if path.parent.name == "pretrain" else "")


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
    """The newest complete checkpoint whose files match their checksums (damaged ones are skipped,
    with a message saying which and why)."""
    for d in reversed(complete(ckpt_dir)):
        try:
            check_complete(d, verify=True)
            return d
        except CheckpointError as e:
            if _rank0():
                print(f"skipping {d}: {e}")
    return None


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
    check_complete(p, verify=True)
    return p


def _check_frozen(path: Path, man: dict, frozen: dict | None) -> None:
    saved = man.get("frozen")
    if not saved:
        return
    if frozen is None or frozen["hash"] != saved["hash"]:
        now = "nothing frozen" if frozen is None else f"a base with hash {frozen['hash']} from {frozen['sources']}"
        raise CheckpointError(
            f"checkpoint {path} stores only the trained leaves; its frozen base ({len(saved['paths'])} leaves, "
            f"hash {saved['hash']}) came from {saved['sources']}, but this run has {now}: point "
            "model.vision.from_pretrained / model.llm.from_pretrained (and the freeze patterns) at the same base")


def load(path: str | Path, state: TrainState, par=None, frozen: dict | None = None) -> dict:
    """Load a checkpoint in place into ``state`` (params, optimizer, counters, scaler, RNG states),
    whatever layout wrote it: under a plan (``par``) each rank reads its slices. Returns the meta dict
    (with "step" and whatever the caller saved, e.g. "sampler")."""
    path = Path(path)
    man = check_complete(path, verify=True)
    _check_frozen(path, man, frozen)
    sd = to_state_dict(state, par=par, frozen=frozen if man.get("frozen") else None)
    sd["meta"] = ""
    have = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in sd if k not in have]
    extra = [k for k in have if k not in sd]
    if par is not None and extra:              # keys that other ranks of this layout load
        from neva.parallel.dtensor import leaf_of
        model_leaves, trained = set(par.placements()), set(state.trainable)

        def elsewhere(k: str) -> bool:
            leaf = leaf_of(k) or ""
            return ((par.layout.pp > 1 and leaf in model_leaves)                     # another stage's leaf
                    or (par.zero1 and k.startswith("optim/") and leaf in trained))   # another dp rank's state
        extra = [k for k in extra if not elsewhere(k)]
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
    """The params of a checkpoint (any layout) into a full tree shaped like ``params`` (export,
    evaluation); leaves the checkpoint left out as frozen keep the values given in ``params``."""
    path = Path(path)
    check_complete(path, verify=True)
    have = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd = {f"params/{p}": v.clone() for p, v in flatten(params).items() if f"params/{p}" in have}
    out = {f"params/{p}": v for p, v in flatten(params).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(sd, checkpoint_id=str(path))
    out.update(sd)
    return unflatten({k[len("params/"):]: v for k, v in out.items()})
