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
or whose files disagree with it, is incomplete or damaged: ``latest`` skips it (saying which and why),
``load`` refuses it with a clear error.

One run per folder: before a run writes to a checkpoint folder, ``claim`` refuses a fresh start next
to an intact checkpoint of an earlier run, and moves damaged checkpoints, and those later than the
one a run resumes (an abandoned continuation), to ``<dir>/set_aside/``, saying which. ``keep_last``
clean-up never deletes the checkpoint just written, never counts a damaged one among those it keeps,
and leaves alone any later than the step it saved.

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
        _VERIFIED[str(final.resolve())] = _stamp(final)   # its checksums were just computed from these files
        if keep_last:
            _clean_up(ckpt_dir, step, keep_last)
    _barrier()
    return final


def _clean_up(ckpt_dir: Path, step: int, keep_last: int) -> None:
    """Keep ``step`` (just written) and the newest intact checkpoints before it, ``keep_last`` in all.
    Older ones go, a damaged one among them without counting (said once); later ones are not this
    run's (``claim`` set them aside at start; another run writing here now?) and stay."""
    kept = 1
    for n, d in reversed(_step_dirs(ckpt_dir)):
        if n > step:
            print(f"note: {d} is later than step {step}, which this run just saved: is another run writing to "
                  f"{ckpt_dir}? left as it is")
            continue
        if n == step:
            continue
        if kept < keep_last:
            why = _problem(d, verify=True)
            if why is None:
                kept += 1
                continue
            print(f"removing damaged checkpoint {d}: {why}")
        shutil.rmtree(d, ignore_errors=True)


_VERIFIED: dict[str, tuple] = {}     # checkpoint -> its files' (name, size, mtime) when their checksums last matched


def _stamp(path: Path) -> tuple:
    return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in path.iterdir() if f.is_file()
                        for st in [f.stat()]))


def _problem(path: Path, verify: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint (None if it is); ``verify``: checksums too (not read
    again for files this process wrote or checked that have not changed since: clean-up at every
    save would otherwise re-read the checkpoints it keeps)."""
    key = str(Path(path).resolve())
    if verify and _VERIFIED.get(key) is not None and _VERIFIED[key] == _stamp(path):
        return None
    man_path = path / MANIFEST
    if not man_path.exists():
        return f"it has no {MANIFEST}: it was interrupted while being written"
    try:
        man = json.loads(man_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"its {MANIFEST} is corrupt ({e})"
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        return f"its {MANIFEST} is not a checkpoint manifest"
    for name, size in man["files"].items():
        f = path / name
        if not f.exists() or f.stat().st_size != size:
            got = f"{f.stat().st_size} bytes" if f.exists() else "missing"
            return f"file {name} is {got}, the manifest says {size} bytes: the checkpoint is damaged"
        if verify and name in man.get("blake2b", {}) and _digest(f) != man["blake2b"][name]:
            return f"file {name} does not match its checksum: the checkpoint is corrupt"
    if verify:
        _VERIFIED[key] = _stamp(path)
    return None


def check_complete(path: Path, verify: bool = False) -> dict:
    """The manifest of a complete checkpoint; raise CheckpointError naming what is wrong.
    ``verify``: also compare every file's checksum (reads the whole checkpoint)."""
    why = _problem(Path(path), verify)
    if why is not None:
        raise CheckpointError(f"checkpoint {path}: {why}; resume from an older one (train.resume=auto picks the "
                              "newest intact one)")
    return json.loads((Path(path) / MANIFEST).read_text())


def tag_of(path: str | Path) -> str:
    """The stage a checkpoint belongs to ("pretrain" for a recipe's first stage, "" for the main one)."""
    path = Path(path)
    man = check_complete(path)
    return man.get("tag", "pretrain" if path.parent.name == "pretrain" else "")


def _step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_N`` folder under ``ckpt_dir`` (complete or not), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in ckpt_dir.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(found)


def step_of(path: str | Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (step_N)")
    return int(m.group(1))


def complete(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_dir`` (manifest and sizes; checksums not read), oldest first."""
    return [d for _, d in _step_dirs(ckpt_dir) if _problem(d) is None]


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; every newer one is skipped
    with a line saying which and why."""
    for _, d in reversed(_step_dirs(ckpt_dir)):
        why = _problem(d, verify=True)
        if why is None:
            return d
        if _rank0():
            print(f"train.resume=auto: skipping {d}: {why}")
    return None


def claim(ckpt_dir: str | Path, resumed: Path | None, auto: bool, dry: bool = False) -> list[str]:
    """Make ``ckpt_dir`` hold one run before a run writes to it; ``resumed`` is the checkpoint the run
    continues (None: it starts at step 0), ``auto`` whether ``train.resume=auto`` chose it.

    A fresh start (or a checkpoint from another folder) next to an intact checkpoint of an earlier
    run is refused (CheckpointError saying how to go on), unless ``auto`` found none intact. Checkpoints
    the run cannot continue (damaged ones; with ``resumed`` here, every later one: an abandoned
    continuation) move to ``ckpt_dir/set_aside/``, so nothing later is ever ranked newest and nothing is
    deleted. ``dry``: only check. -> one line per folder moved."""
    ckpt_dir = Path(ckpt_dir)
    here = resumed is not None and Path(resumed).resolve().parent == ckpt_dir.resolve()
    since = step_of(resumed) if here else -1
    later = [d for n, d in _step_dirs(ckpt_dir) if n > since]
    if not here and not auto:
        intact = [d.name for d in later if _problem(d) is None]
        if intact:
            start = f"continues {resumed}" if resumed is not None else "starts at step 0 (train.resume=none)"
            raise CheckpointError(
                f"{ckpt_dir} holds checkpoints of an earlier run ({', '.join(intact[-3:])}) and this run {start}: "
                f"its checkpoints, metrics and config.json would mix with that run's. Continue the earlier run with "
                f"train.resume=auto, give this one another run.dir, or move {ckpt_dir} away first")
    lines = []
    for d in [] if dry else later:
        why = _problem(d) or ("its files do not match their checksums" if auto or not here else
                              f"it is later than {Path(resumed).name}, which train.resume names: a continuation "
                              "this run replaces")
        dest = ckpt_dir / "set_aside" / d.name
        k = 1
        while dest.exists():
            k += 1
            dest = ckpt_dir / "set_aside" / f"{d.name}.{k}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(d, dest)
        lines.append(f"moved {d} to {dest}: {why}")
    return lines


def on_rank0(fn):
    """``fn()`` on rank 0 only (one reader of a checkpoint folder, one writer, one set of messages);
    its result, or its error, on every rank."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return fn()
    box = [None]
    if tdist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - every rank raises it
            box[0] = ("err", (type(e) if isinstance(e, CheckpointError) else RuntimeError, str(e)))
    tdist.broadcast_object_list(box, src=0)
    kind, val = box[0]
    if kind == "err":
        raise val[0](val[1])
    return val


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
    extra = [k for k in have if k not in sd]
    if par is not None and extra:              # keys that other ranks of this layout load
        from neva.parallel.dtensor import leaf_of
        model_leaves, trained = set(par.placements()), set(state.trainable)

        def elsewhere(k: str) -> bool:
            leaf = leaf_of(k) or ""
            return ((par.layout.pp > 1 and leaf in model_leaves)                     # another stage's leaf
                    or (par.zero1 and k.startswith("optim/") and leaf in trained))   # another dp rank's state
        extra = [k for k in extra if not elsewhere(k)]
    check_fits(path, sd, have, extra,
               "Was it written with another model config, precision or set of frozen parameters?")
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


def check_fits(path: Path, want: dict, have: dict, unexpected: list[str], hint: str) -> None:
    """Raise CheckpointError unless the checkpoint's metadata ``have`` holds every key of ``want``
    (key -> tensor, or anything without a shape) at its shape, and nothing in ``unexpected``; the
    message names the missing, unexpected and misshapen leaves."""
    missing = [k for k in want if k not in have]
    shapes = [f"{k} {tuple(have[k].size)} in the checkpoint, {tuple(v.shape)} here" for k, v in want.items()
              if k in have and isinstance(v, torch.Tensor) and tuple(have[k].size) != tuple(v.shape)]
    parts = [f"{len(xs)} {what}: {', '.join(xs[:6])}{f' and {len(xs) - 6} more' if len(xs) > 6 else ''}"
             for what, xs in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if xs]
    if parts:
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(parts) + f". {hint}")


def load_params(path: str | Path, params: dict) -> dict:
    """The params of a checkpoint (any layout) into a full tree shaped like ``params`` (export,
    evaluation). The checkpoint must hold exactly the leaves of ``params`` at their shapes, except
    those it left out as frozen, which keep the values given in ``params``; anything else is a
    CheckpointError naming the leaves (a model built from another config is never half loaded)."""
    path = Path(path)
    man = check_complete(path, verify=True)
    have = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    frozen = set((man.get("frozen") or {}).get("paths", ()))
    flat = flatten(params)
    want = {f"params/{p}": v for p, v in flat.items() if p not in frozen}
    check_fits(path, want, have, [k for k in have if k.startswith("params/") and k not in want],
               "Was it written with another config? Use the run's own config.json (neva.export --config), "
               "and the same model.* overrides")
    sd = {k: v.clone() for k, v in want.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(sd, checkpoint_id=str(path))
    return unflatten({**flat, **{k[len("params/"):]: v for k, v in sd.items()}})
