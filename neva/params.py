"""Parameter pytrees: specs, per-path seeded init, and tree utilities.

A params tree is a nested dict of tensors whose paths read like ``llm/layers/3/attn/wq``. Every model
part describes its leaves with ``ParamSpec`` (shape, logical axes, init); ``init`` draws each leaf
from a generator seeded by (seed, hash of its path), so a leaf's values depend only on the seed and
its path: adding a layer or reordering a dict never changes the others, and a sharded init equals
the slice of the unsharded one bit for bit.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

Tree = dict[str, Any]


@dataclass(frozen=True)
class Init:
    """How a leaf is drawn: ``normal`` (mean 0, ``std``), ``zeros``, ``ones`` or ``uniform`` (+-``std``)."""

    kind: str = "normal"
    std: float = 0.02

    def __call__(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        if self.kind == "zeros":
            return torch.zeros(shape)
        if self.kind == "ones":
            return torch.ones(shape)
        if self.kind == "normal":
            return torch.randn(shape, generator=gen) * self.std
        if self.kind == "uniform":
            return (torch.rand(shape, generator=gen) * 2 - 1) * self.std
        raise ValueError(f"unknown init kind {self.kind!r}; use normal, zeros, ones or uniform")


NORMAL = Init("normal", 0.02)
ZEROS = Init("zeros")
ONES = Init("ones")


def normal(std: float) -> Init:
    return Init("normal", float(std))


@dataclass(frozen=True)
class ParamSpec:
    """A leaf's shape, one logical axis name per dim (``None`` = never sharded) and its init.

    Logical axes are what the parallel plan maps to mesh axes: ``heads``, ``kv_heads``, ``mlp``,
    ``vocab``, ``experts`` ... A linear weight is ``[out, in]`` as in ``F.linear`` and HF.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Init = NORMAL

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec shape {self.shape} and axes {self.axes} differ in rank")


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


# ---------------------------------------------------------------------------------------- trees
def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}, in insertion order."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any]) -> Tree:
    """{"a/b/c": leaf} -> nested dict."""
    tree: Tree = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def leaves(tree: Tree) -> Iterator[tuple[str, Any]]:
    yield from flatten(tree).items()


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree, with_path: bool = False) -> Tree:
    """Map ``fn`` over the leaves of ``tree`` and the same paths of ``rest``; ``with_path`` passes the
    path first. A path missing from one of ``rest`` is named in the error."""
    flat, others = flatten(tree), [flatten(r) for r in rest]
    for o in others:
        missing = [p for p in flat if p not in o]
        if missing:
            raise KeyError(f"tree_map: paths missing in one of the trees: {missing[:5]}")
    if with_path:
        return unflatten({p: fn(p, v, *(o[p] for o in others)) for p, v in flat.items()})
    return unflatten({p: fn(v, *(o[p] for o in others)) for p, v in flat.items()})


def count(tree: Tree) -> int:
    """Number of scalars in a tree of tensors or specs."""
    return sum(math.prod(v.shape) for _, v in leaves(tree))


def nbytes(tree: Tree) -> int:
    return sum(v.numel() * v.element_size() for _, v in leaves(tree))


def cast(tree: Tree, dtype: torch.dtype, only_float: bool = True) -> Tree:
    """Cast floating leaves to ``dtype`` (integer leaves are kept unless ``only_float=False``)."""
    return tree_map(lambda t: t.to(dtype) if (t.is_floating_point() or not only_float) else t, tree)


def select(tree: Tree, pattern: str) -> Tree:
    """Sub-tree of leaves whose path matches the regex ``pattern`` (``re.search``)."""
    rx = re.compile(pattern)
    return unflatten({p: v for p, v in leaves(tree) if rx.search(p)})


def merge(base: Tree, update: Tree) -> Tree:
    """``base`` with the leaves of ``update`` replacing (or adding) those at the same paths."""
    flat = flatten(base)
    flat.update(flatten(update))
    return unflatten(flat)


# ----------------------------------------------------------------------------------------- init
def path_seed(seed: int, path: str) -> int:
    """A 63-bit seed from (seed, path): stable across processes and Python versions."""
    h = hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def init_leaf(spec: ParamSpec, seed: int, path: str, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(path_seed(seed, path))
    return spec.init(tuple(spec.shape), gen).to(dtype)


def init(specs: Tree, seed: int, dtype: torch.dtype = torch.float32, prefix: str = "") -> Tree:
    """Materialise a tree of ParamSpec; each leaf depends only on (seed, full path)."""
    return tree_map(
        lambda p, s: init_leaf(s, seed, f"{prefix}/{p}" if prefix else p, dtype), specs, with_path=True
    )


def axes(specs: Tree) -> Tree:
    """Tree of logical-axes tuples, for the parallel plan."""
    return tree_map(lambda s: s.axes, specs)


def check_shapes(params: Tree, specs: Tree, what: str = "params") -> None:
    """Raise naming every missing, extra or misshapen leaf of ``params`` against ``specs``."""
    fp, fs = flatten(params), flatten(specs)
    missing = [p for p in fs if p not in fp]
    extra = [p for p in fp if p not in fs]
    bad = [f"{p}: found {tuple(fp[p].shape)}, expected {tuple(fs[p].shape)}"
           for p in fs if p in fp and tuple(fp[p].shape) != tuple(fs[p].shape)]
    msgs = []
    if missing:
        msgs.append(f"missing {len(missing)}: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if extra:
        msgs.append(f"unexpected {len(extra)}: " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    if bad:
        msgs.append("wrong shape: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    if msgs:
        raise ValueError(f"{what} do not match the config: " + " | ".join(msgs))
