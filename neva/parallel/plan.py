"""The parallel plan: logical axes -> mesh axes, resolved to a placement per leaf.

A placement is a tuple with one mesh axis (``"tp"``, ``"ep"``) or None per dim of the leaf. Rules map
logical axes (from each leaf's ParamSpec) to mesh axes; path-regex overrides come first (first match
wins, big_vision style). ``validate`` checks everything that must divide, up front, and suggests a
layout that fits; ``shard`` slices a full tree into one rank's local tree (dropping leaves of other
pipeline stages); ``unshard`` puts local trees back together.

Everything else a layout decides is a table of the plan too, read top to bottom:
  stage_rules  path regex -> pipeline stage ("first", "last", or "layer": the stage of layer group(1))
  sp_parts     top-level parts whose activations are split along the sequence under SP
  cp_parts     top-level parts whose sequence is split over cp (the LLM; never the encoder: a ViT's
               patches attend both ways within one image)
  towers       path regex -> the layout of a tower, first match wins: "tp" (sharded by the rules),
               "replicate" (whole on every rank, NeMo's HF-loaded ViT) or "frames" (whole, and the
               ranks that hold the same samples, cp x tp, each encode a share of the media rows;
               the features are gathered before they are spliced in)
  shares       leaves that run where another leaf runs (a LoRA factor: its weight's stage and TP region)
  read_whole   leaves read whole from HF folders even under a plan
A top-level part none of whose leaves is placed on tp is replicated: it runs with tp off.

Mesh order is (pp, dp, ep, cp, tp), tp fastest, then cp (Megatron's order):
rank = (((pp_i * dp + dp_i) * ep + ep_i) * cp + cp_i) * tp + tp_i. Data is split over dp x ep
(``Layout.data_index``; cp ranks, like tp ranks, read the same samples); experts over ep; heads,
mlp and vocab over tp; layers over pp; the LLM's sequence over cp.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from neva.config import ModelConfig
from neva.params import ParamSpec, flatten, unflatten

RULES = {"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp", "experts": "ep"}
AXES = ("pp", "dp", "ep", "cp", "tp")
STAGE_RULES = ((r"^llm/layers/(\d+)/", "layer"),          # media, projector and embedding on the first
               (r"^llm/(norm|lm_head)/", "last"),          # stage; the final norm and the head on the last
               (r"", "first"))
SP_PARTS = ("llm",)
CP_PARTS = ("llm",)
VISION_TOWER = r"^(vision|projector)/"                     # the encoder and the projector
TOWER_LAYOUTS = ("tp", "replicate", "frames")
SHARES = ((r"^(.+)_lora_[ab]$", r"\1"),)
READ_WHOLE = (r"^llm/(embed|lm_head)/w$",)               # the image token may still grow the vocabulary


@dataclass(frozen=True)
class Layout:
    """Sizes of the mesh axes; ``dp`` is what is left of the world size."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    sp: bool = False
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.ep * self.dp * self.cp

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for axis in reversed(AXES):
            out[axis] = rank % self.size(axis)
            rank //= self.size(axis)
        return out

    def rank(self, coords: dict[str, int]) -> int:
        r = 0
        for axis in AXES:
            r = r * self.size(axis) + coords.get(axis, 0)
        return r

    def data_index(self, coords: dict) -> int:
        """Which shard of each global batch a rank reads: ranks that differ in dp or ep see different
        samples (ep ranks too: their experts then see every ep rank's tokens)."""
        return coords["dp"] * self.ep + coords["ep"]

    def __str__(self) -> str:
        s = "x".join(f"{a}{self.size(a)}" for a in AXES if self.size(a) > 1) or "single"
        return s + ("+sp" if self.sp else "")

    @staticmethod
    def fit(world: int, tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False, cp: int = 1) -> "Layout":
        """The layout with dp = world / (tp * pp * ep * cp); an error if that does not divide."""
        if min(tp, pp, ep, cp) < 1:
            raise ValueError(f"parallel sizes must be >= 1: tp={tp} pp={pp} ep={ep} cp={cp}")
        m = tp * pp * ep * cp
        if world % m:
            raise ValueError(f"world size {world} is not divisible by tp*pp*ep*cp = {tp}*{pp}*{ep}*{cp} = {m}; "
                             f"launch a multiple of {m} processes or change parallel.tp/pp/ep/cp")
        return Layout(tp=tp, pp=pp, ep=ep, dp=world // m, sp=sp, cp=cp)


@functools.lru_cache(maxsize=256)   # every leaf's stage asks; a 32-layer pp4 search tries 4495 splits
def stage_layers(n_layers: int, pp: int, first_cost: float = 0.0, last_cost: float = 0.0) -> tuple[range, ...]:
    """Contiguous layer ranges per stage minimising the most loaded stage, where each layer costs 1,
    stage 0 also carries ``first_cost`` (vision, projector) and the last ``last_cost`` (LM head)."""
    if pp > n_layers:
        raise ValueError(f"parallel.pp={pp} stages need at least {pp} layers; the LLM has {n_layers}")
    if math.comb(n_layers - 1, pp - 1) > 20000:  # too many splits to try: even
        bounds = [round(i * n_layers / pp) for i in range(pp + 1)]
        return tuple(range(bounds[i], bounds[i + 1]) for i in range(pp))

    def key(bounds):
        cost = [bounds[i + 1] - bounds[i] for i in range(pp)]
        cost[0] += first_cost
        cost[-1] += last_cost
        return max(cost), sum(c * c for c in cost)
    splits = ([0, *cuts, n_layers] for cuts in itertools.combinations(range(1, n_layers), pp - 1))
    bounds = min(splits, key=key)
    return tuple(range(bounds[i], bounds[i + 1]) for i in range(pp))


def stage_costs(cfg: ModelConfig, text_tokens: int = 64) -> tuple[float, float]:
    """Rough cost of vision + projector and of the LM head in LLM-layer units, for a sample of one
    image and ``text_tokens`` words."""
    l, v = cfg.llm, cfg.vision
    tokens = cfg.tokens_per_image + text_tokens
    layer = tokens * (2 * l.dim * (l.n_heads + l.n_kv_heads) * l.hd + 3 * l.dim * l.ffn_dim * (l.top_k if l.n_experts else 1))
    vis = sum(t.layers_used * t.tokens_out * (4 * t.dim * t.dim + 2 * t.dim * t.mlp_dim) for t in v.parts)
    head = text_tokens * l.dim * l.vocab_size
    return vis / layer, head / layer


@dataclass(frozen=True)
class Plan:
    layout: Layout = field(default_factory=Layout)
    rules: tuple = tuple(RULES.items())
    overrides: tuple = ()            # ((regex, "replicate" | tuple of mesh axis or None per dim), ...)
    stage_rules: tuple = STAGE_RULES
    sp_parts: tuple = SP_PARTS
    cp_parts: tuple = CP_PARTS
    towers: tuple = ((VISION_TOWER, "tp"),)
    shares: tuple = SHARES
    read_whole: tuple = READ_WHOLE

    @staticmethod
    def vision_rows(vision: str) -> tuple:
        """The ``towers`` rows of ``parallel.vision=tp|replicate|frames``."""
        if vision not in TOWER_LAYOUTS:
            raise ValueError(f"parallel.vision={vision!r}: use one of {TOWER_LAYOUTS}")
        return ((VISION_TOWER, vision),)

    def tower(self, path: str) -> str:
        """The layout of the tower a leaf belongs to (first matching ``towers`` row; "tp" if none)."""
        return next((lay for rx, lay in self.towers if re.search(rx, path)), "tp")

    # ------------------------------------------------------------------------------ placements
    def placement(self, path: str, spec: ParamSpec) -> tuple:
        for rx, val in self.overrides:
            if re.search(rx, path):
                if val == "replicate":
                    return (None,) * len(spec.shape)
                if len(val) != len(spec.shape):
                    raise ValueError(f"plan override {rx!r} gives {len(val)} dims for {path} of shape {spec.shape}")
                return tuple(val)
        if self.tower(path) != "tp":
            return (None,) * len(spec.shape)
        rules = dict(self.rules)
        out = []
        for ax in spec.axes:
            mesh_ax = rules.get(ax)
            out.append(mesh_ax if mesh_ax and self.layout.size(mesh_ax) > 1 else None)
        return tuple(out)

    def placements(self, specs: dict) -> dict[str, tuple]:
        return {p: self.placement(p, s) for p, s in flatten(specs).items()}

    def base(self, path: str) -> str:
        """The leaf ``path`` runs with (``shares``): itself unless it is, e.g., a LoRA factor."""
        for rx, repl in self.shares:
            if re.search(rx, path):
                return re.sub(rx, repl, path)
        return path

    def replicated_parts(self, specs: dict) -> frozenset:
        """Top-level parts the plan keeps whole on every tp rank (they then run with tp off)."""
        if self.layout.tp == 1:
            return frozenset()
        by_part: dict[str, list] = {}
        for p, v in self.placements(specs).items():
            by_part.setdefault(p.split("/")[0], []).append(v)
        return frozenset(part for part, vs in by_part.items() if all("tp" not in v for v in vs))

    def frame_parts(self, specs: dict) -> frozenset:
        """Top-level parts that run frame-parallel (a ``towers`` row "frames")."""
        return frozenset(p.split("/")[0] for p in flatten(specs) if self.tower(p) == "frames")

    def grad_sums(self, specs: dict) -> dict[str, tuple[str, ...]]:
        """Per leaf, the groups its gradient is summed over after the backward (``Dist`` fields):
        every leaf over the ranks that read other samples (``data``: dp x ep; ``dp`` for expert
        leaves, whose ep ranks already received every ep rank's tokens); over ``cp`` every leaf
        (each cp rank's loss covers its own tokens); and over ``tp`` a leaf left whole whose
        gradient each tp rank holds a part of: one running where a tp-sharded leaf runs (a LoRA
        factor of a sharded weight sums over the other factor's shards), under SP one of an SP part
        outside the TP regions (norms, router: each rank saw its slice of the sequence), or one of a
        frame-parallel part (each rank encoded its share of the media)."""
        pl = self.placements(specs)
        sp = frozenset(self.sp_parts) - self.replicated_parts(specs) if self.layout.sp else frozenset()
        shared = sp | self.frame_parts(specs)
        out = {}
        for p, place in pl.items():
            base = pl.get(self.base(p), place)
            partial = self.layout.tp > 1 and "tp" not in place and ("tp" in base or p.split("/")[0] in shared)
            out[p] = (("dp" if "ep" in place else "data",) + (("cp",) if self.layout.cp > 1 else ())
                      + (("tp",) if partial else ()))
        return out

    # --------------------------------------------------------------------------------- stages
    def stages(self, cfg: ModelConfig) -> tuple[range, ...]:
        return stage_layers(cfg.llm.n_layers, self.layout.pp, *stage_costs(cfg))

    def stage_of(self, path: str, cfg: ModelConfig) -> int:
        """Pipeline stage that holds a leaf, by ``stage_rules`` (first match wins)."""
        path = self.base(path)
        for rx, where in self.stage_rules:
            m = re.search(rx, path)
            if m is None:
                continue
            if where == "layer":
                i = int(m.group(1))
                return next(s for s, r in enumerate(self.stages(cfg)) if i in r)
            return {"first": 0, "last": self.layout.pp - 1}[where]
        raise ValueError(f"no plan stage rule matches {path}: add one to Plan.stage_rules")

    # ------------------------------------------------------------------------------- validate
    def validate(self, cfg: ModelConfig, specs: dict, world: int | None = None, suggest: bool = True) -> "Plan":
        """Raise, naming what does not divide and a layout that would, before any work starts."""
        lay, l, v = self.layout, cfg.llm, cfg.vision
        problems = []
        if world is not None and world != lay.world:
            problems.append(f"the layout {lay} needs {lay.world} processes but {world} were launched")
        if lay.ep > 1 and not l.n_experts:
            problems.append(f"parallel.ep={lay.ep} needs an MoE LLM; {l.kind} has no experts")
        if l.n_experts and l.n_experts % lay.ep:
            problems.append(f"n_experts={l.n_experts} is not divisible by parallel.ep={lay.ep}")
        if lay.pp > l.n_layers:
            problems.append(f"parallel.pp={lay.pp} is more stages than the {l.n_layers} LLM layers")
        if lay.pp > 1 and l.tie_embeddings:
            problems.append("tied embeddings with parallel.pp>1 are not supported (the embedding and the LM "
                            "head live on different stages); untie them or use pp=1")
        if lay.sp and lay.tp == 1:
            problems.append("parallel.sp=true needs parallel.tp > 1 (the sequence is split over tp)")
        bad_towers = [lay_ for _, lay_ in self.towers if lay_ not in TOWER_LAYOUTS]
        if bad_towers:
            problems.append(f"plan towers {bad_towers}: a tower's layout is one of {TOWER_LAYOUTS}")
        elif "projector" in self.frame_parts(specs) and "vision" not in self.frame_parts(specs):
            problems.append("a frame-parallel projector needs a frame-parallel vision encoder (it shares the "
                            "encoder's media rows): use parallel.vision=frames for both")
        pl = self.placements(specs)
        flat = flatten(specs)
        for path, place in pl.items():
            shape = flat[path].shape
            for d, ax in enumerate(place):
                if ax is not None and shape[d] % lay.size(ax):
                    problems.append(f"{path} dim {d} ({flat[path].axes[d]}) of size {shape[d]} "
                                    f"does not divide by {ax}={lay.size(ax)}")
        heads = [("llm", l.n_heads, "n_heads"), ("llm", l.n_kv_heads, "n_kv_heads")]
        heads += [("vision", t.n_heads, f"vision.{'towers.' + str(i) + '.' if v.towers else ''}n_heads")
                  for i, t in enumerate(v.parts)]
        reps = self.replicated_parts(specs)
        for part, n, name in heads:
            if part not in reps and lay.tp > 1 and n % lay.tp:
                problems.append(f"{name}={n} does not divide by tp={lay.tp}")
        for part in dict.fromkeys(p.split("/")[0] for p in pl):  # sharded as a whole or replicated as a whole
            mine = {p: pv for p, pv in pl.items() if p.startswith(part + "/")}
            tp_able = [p for p in mine if "tp" in [dict(self.rules).get(a) for a in flat[p].axes]]
            if part not in reps and lay.tp > 1 and any("tp" not in mine[p] for p in tp_able):
                problems.append(f"{part}: overrides replicate some but not all of its tp-sharded leaves; "
                                f"replicate all of it with ({part + '/.*'!r}, 'replicate') or none")
        if problems:
            raise ValueError(f"parallel plan {lay} does not fit the model:\n  - " + "\n  - ".join(dict.fromkeys(problems))
                             + (self.suggest(cfg, specs, world or lay.world) if suggest else ""))
        return self

    def suggest(self, cfg: ModelConfig, specs: dict, world: int) -> str:
        """A line listing the layouts (tp, pp, ep up to 8) that fit ``world`` processes and the model."""
        fits = []
        cp = self.layout.cp
        for tp, pp, ep in itertools.product([1, 2, 4, 8], repeat=3):
            if world % (tp * pp * ep * cp):
                continue
            cand = replace(self, layout=Layout.fit(world, tp, pp, ep, self.layout.sp and tp > 1, cp))
            try:
                cand.validate(cfg, specs, world, suggest=False)
            except ValueError:
                continue
            fits.append(str(cand.layout))
        fits.sort(key=lambda f: (f.count("pp"), f.count("ep"), -len(f)))
        return ("\n  layouts that fit " + f"{world} processes: " + ", ".join(fits[:12])) if fits else ""

    # ---------------------------------------------------------------------------- shard/unshard
    def shard_leaf(self, t: Tensor, place: tuple, coords: dict) -> Tensor:
        for d, ax in enumerate(place):
            if ax is not None:
                n = self.layout.size(ax)
                step = t.shape[d] // n
                t = t.narrow(d, coords[ax] * step, step)
        return t.contiguous()

    def shard(self, params: dict, specs: dict, cfg: ModelConfig, rank: int) -> dict:
        """Full tree -> this rank's local tree (its stage's leaves, sliced by placement)."""
        coords = self.layout.coords(rank)
        pl = self.placements(specs)
        return unflatten({p: self.shard_leaf(t, pl[p], coords) for p, t in flatten(params).items()
                          if self.stage_of(p, cfg) == coords["pp"]})

    def unshard(self, local_trees: list[dict], specs: dict) -> dict:
        """Local trees of every rank (index = rank) -> the full tree."""
        pl = self.placements(specs)
        flat_local = [flatten(t) for t in local_trees]
        out = {}
        for path, place in pl.items():
            holders = [r for r in range(len(flat_local)) if path in flat_local[r]]
            if not holders:
                raise KeyError(f"unshard: no rank holds {path}")
            out[path] = self.assemble(place, {r: flat_local[r][path] for r in holders})
        return unflatten(out)

    def assemble(self, place: tuple, pieces: dict[int, Tensor]) -> Tensor:
        """One leaf from its pieces on the ranks that hold it (rank -> local tensor)."""
        sharded = [(d, ax) for d, ax in enumerate(place) if ax is not None]
        if not sharded:
            return next(iter(pieces.values()))
        # one representative rank per combination of the sharded axes' coordinates
        reps: dict[tuple, Tensor] = {}
        for r, t in pieces.items():
            c = self.layout.coords(r)
            reps.setdefault(tuple(c[ax] for _, ax in sharded), t)

        def build(level: int, prefix: tuple) -> Tensor:
            if level == len(sharded):
                return reps[prefix]
            d, ax = sharded[level]
            return torch.cat([build(level + 1, prefix + (i,)) for i in range(self.layout.size(ax))], dim=d)
        return build(0, ())

    # --------------------------------------------------------------------------------- summary
    def summary(self, cfg: ModelConfig, specs: dict, bytes_per_param: int = 4) -> str:
        """Per-rank parameter bytes and the collectives each layer issues, for a person to read."""
        lay = self.layout
        pl, flat = self.placements(specs), flatten(specs)
        lines = [f"plan {lay} (world {lay.world}; data split over dp x ep = {lay.dp * lay.ep})"]
        per_stage = self.stages(cfg)
        for s in range(lay.pp):
            r = lay.rank({"pp": s})
            c = lay.coords(r)
            n = sum(math.prod(self.shard_leaf(torch.empty(0).new_empty(flat[p].shape, device="meta"), pl[p], c).shape)
                    for p in flat if self.stage_of(p, cfg) == s)
            lines.append(f"  stage {s}: llm layers {per_stage[s].start}-{per_stage[s].stop - 1}"
                         f"{' + vision + projector + embed' if s == 0 else ''}"
                         f"{' + norm + lm_head' if s == lay.pp - 1 else ''}: "
                         f"{n / 1e6:.2f}M params, {n * bytes_per_param / 2**20:.1f} MiB per rank")
        reps = self.replicated_parts(specs)
        enter = "all-gather(seq) fwd / reduce-scatter bwd" if lay.sp else "identity fwd / all-reduce bwd"
        leave = "reduce-scatter(seq) fwd / all-gather bwd" if lay.sp else "all-reduce fwd / identity bwd"
        if lay.tp > 1:
            lines.append(f"  per LLM layer, attention and MLP each: enter TP {enter}; leave TP {leave}")
            lines.append("  embedding: all-reduce fwd; loss: 3 all-reduces of [tokens] (max, sum-exp, target logit)")
            for part in dict.fromkeys(p.split("/")[0] for p in flat):
                if part not in self.sp_parts:
                    lines.append(f"  {part}: " + ("replicated on every tp rank (no collectives)" if part in reps
                                                 else "sharded over tp: all-reduce fwd and bwd per block"))
        if cfg.llm.n_experts:
            if lay.ep > 1:
                lines.append("  per MoE layer: all-to-all of counts, all-to-all of tokens out and back (x2 in bwd)")
            if lay.sp:
                lines.append("  per MoE layer: all-reduce of routing statistics over tp (load-balancing loss)")
        if lay.cp > 1:
            lines.append(f"  sequence over cp={lay.cp}: each rank chunks i and {2 * lay.cp - 1}-i; per LLM layer: "
                         "all-gather of K and V fwd / reduce-scatter bwd")
        frames = self.frame_parts(specs)
        if frames and lay.cp * lay.tp > 1:
            lines.append(f"  {', '.join(sorted(frames))}: frame-parallel, each of the cp x tp = {lay.cp * lay.tp} "
                         "ranks encodes a share of the media rows; all-gather of the features fwd")
        if lay.pp > 1:
            lines.append("  per micro-batch and stage boundary: send/recv activations fwd, gradients bwd")
        if lay.dp * lay.ep > 1:
            lines.append("  per step: all-reduce of non-expert gradients over dp x ep"
                         + (", of expert gradients over dp" if lay.ep > 1 else ""))
        if lay.sp:
            lines.append("  per step: all-reduce over tp of the gradients of LLM leaves not sharded by tp (norms, router)")
        if lay.cp > 1:
            lines.append("  per step: all-reduce of every gradient over cp (each rank's loss covers its own tokens)")
        return "\n".join(lines)

    def describe(self, cfg: ModelConfig, specs: dict) -> str:
        """The golden-file format: the layout, the stages, then one line per leaf (layers collapsed
        to ``layers/*`` when every layer is placed alike): path, shape, logical axes -> placement."""
        pl, flat = self.placements(specs), flatten(specs)
        lines = [f"layout {self.layout}", "stages " + " ".join(f"{r.start}-{r.stop - 1}" for r in self.stages(cfg)),
                 "replicated " + (",".join(sorted(self.replicated_parts(specs))) or "-")]
        if self.frame_parts(specs):
            lines.append("frame-parallel " + ",".join(sorted(self.frame_parts(specs))))
        seen: dict[str, str] = {}
        for p in flat:
            key = re.sub(r"layers/\d+/", "layers/*/", p)
            line = f"{key} {tuple(flat[p].shape)} {flat[p].axes} -> {pl[p]}"
            if seen.setdefault(key, line) != line:
                line = f"{p} {tuple(flat[p].shape)} {flat[p].axes} -> {pl[p]}"  # a layer placed differently
                seen[p] = line
        return "\n".join(lines + list(dict.fromkeys(seen.values()))) + "\n"
