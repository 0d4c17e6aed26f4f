"""safetensors folders, read lazily and written in shards.

``Checkpoint(folder)`` is a read-only view over ``model.safetensors`` or a sharded
``model.safetensors.index.json`` set: it knows every key's file, shape and dtype from the headers
alone and reads one tensor (or one slice of it) at a time through ``safe_open(...).get_slice``, so a
multi-GB checkpoint is never in memory at once beyond the tensors the caller keeps. A slice is a tuple
of contiguous ``slice``s (one per leading dim; fewer is fine), which is how a rank of a parallel plan
reads only its shard.

``write(tensors, folder)`` writes one file, or shards of at most ``max_shard_bytes`` plus the index
that transformers and vLLM read.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")  # what write() writes
Index = tuple[slice, ...]


def read_json(path: str) -> dict:
    """A JSON object from ``path``; an error naming the file when it is missing, not JSON or not an object."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face folder written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): is the file truncated or from another program? "
                         "Re-download it or save the model again") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object: expected a Hugging Face "
                         "config.json ({\"model_type\": ...})")
    return d


def check_index(index: Index, shape: tuple[int, ...], key: str) -> None:
    """A read index must be contiguous slices (step 1) inside ``shape``, at most one per dim."""
    if len(index) > len(shape):
        raise ValueError(f"{key}: slice {index} has more dims than the tensor {shape}")
    for s, n in zip(index, shape):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"{key}: read slices must be contiguous python slices; got {s!r}")
        a, b = (0 if s.start is None else s.start), (n if s.stop is None else s.stop)
        if not 0 <= a <= b <= n:
            raise ValueError(f"{key}: slice {s} is outside a dim of size {n} (full shape {shape})")


class Checkpoint:
    """Lazy view of one folder's safetensors. Use as a context manager (files stay mmapped while open).

    keys: set of tensor names; shape(k), dtype(k): from the headers; read(k, index): the tensor or
    its slice, as stored (the caller casts)."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
        if os.path.isfile(index_path):
            wm = read_json(index_path).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ValueError(f"{index_path} has no weight_map: not a safetensors index")
            self.file_of = dict(wm)
        elif os.path.isfile(single):
            self.file_of = None                      # filled from the header on open
        else:
            others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
            hint = f" (found {others}; convert .bin checkpoints to safetensors first)" if others else ""
            raise FileNotFoundError(f"{folder}: neither {SINGLE} nor {INDEX}{hint}")
        self._stack: ExitStack | None = None
        self._open: dict[str, object] = {}

    def __enter__(self) -> "Checkpoint":
        self._stack = ExitStack()
        if self.file_of is None:
            h = self._handle(SINGLE)
            self.file_of = {k: SINGLE for k in h.keys()}
        else:
            missing = sorted({f for f in self.file_of.values() if not os.path.isfile(os.path.join(self.folder, f))})
            if missing:
                raise FileNotFoundError(f"{self.folder}/{INDEX} names shard files that are missing: {missing}")
        return self

    def __exit__(self, *exc) -> None:
        self._open.clear()
        if self._stack is not None:
            self._stack.close()

    def _handle(self, fname: str):
        if fname not in self._open:
            path = os.path.join(self.folder, fname)
            try:
                self._open[fname] = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
                raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                                 "re-download it or save the model again") from None
        return self._open[fname]

    @property
    def keys(self) -> set[str]:
        return set(self.file_of)

    def _slice(self, key: str):
        if key not in self.file_of:
            raise KeyError(f"{self.folder}: tensor {key!r} is not in the checkpoint")
        h = self._handle(self.file_of[key])
        try:
            return h.get_slice(key)
        except Exception as e:  # the index names a key its shard does not hold
            raise KeyError(f"{self.folder}/{self.file_of[key]}: tensor {key!r} listed in the index is missing") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def read(self, key: str, index: Index | None = None) -> Tensor:
        sl = self._slice(key)
        if index is None or all(s == slice(None) for s in index):
            return sl[:]
        check_index(index, tuple(sl.get_shape()), key)
        return sl[index]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file here: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write(tensors: list[tuple[str, Tensor]], folder: str, max_shard_bytes: int) -> list[str]:
    """Write ``(key, tensor)`` pairs as one ``model.safetensors`` or, above ``max_shard_bytes``, as
    shards of at most that size (a larger tensor gets a shard of its own) plus the index json.
    Shards are materialised on the CPU one at a time. Returns the file names written."""
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):      # an earlier save's weights (a stale index would be loaded); nothing else
        if WEIGHT_FILE.fullmatch(f):
            os.remove(os.path.join(folder, f))
    plan: list[list[int]] = [[]]
    size = 0
    for i, (_, t) in enumerate(tensors):
        n = _nbytes(t)
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(i)
        size += n
    meta = {"format": "pt"}
    names = [SINGLE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                             for i in range(len(plan))]
    weight_map = {}
    for name, idx in zip(names, plan):
        shard = {tensors[i][0]: tensors[i][1].detach().contiguous().cpu() for i in idx}
        save_file(shard, os.path.join(folder, name), metadata=meta)
        os.chmod(os.path.join(folder, name), _new_file_mode())   # safetensors writes 0600; the folder is shared
        weight_map.update({k: name for k in shard})
        del shard
    if len(plan) == 1:
        return names
    total = sum(_nbytes(t) for _, t in tensors)
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names + [INDEX]


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
