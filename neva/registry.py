"""Parts by name: a config's ``kind`` picks the functions that build and run a part.

    model.vision.kind="siglip"          -> ENCODERS["siglip"]         (neva/vision.py: clip, siglip; neva/dino.py: dino;
                                                                       neva/fused.py: fused, towers of the others)
    model.projector.kind="mlp2x_gelu"   -> PROJECTORS["mlp2x_gelu"]   (neva/projector.py)
    the MLP of each LLM block           -> FFNS["moe" | "swiglu" | "relu2" | "gelu" | "gelu_tanh"] (neva/llm.py)

A part is a pair ``specs(cfg) -> tree of ParamSpec`` and ``apply(params, x, cfg, dist) -> y``, plus the
one number a config must know without running it (tokens per image). An experiment adds its own part
without touching ``neva/``; the name is looked up when a model is built, so registering first is enough:

    from neva.registry import PROJECTORS, Projector
    PROJECTORS.register("pixel_shuffle", Projector(specs=my_specs, apply=my_apply, tokens=lambda n, cfg: n // 4))
    cfg = ModelConfig(projector=ProjectorConfig("pixel_shuffle"), ...)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Encoder:
    """specs(VisionConfig) -> tree; apply(params, images float[N, 3, H, W], VisionConfig, Dist) ->
    features [N, tokens(cfg), D_vision]; tokens(VisionConfig) -> tokens per image it emits."""

    specs: Callable[..., dict]
    apply: Callable[..., Any]
    tokens: Callable[[Any], int]


def _same(n: int, cfg: Any) -> int:
    return n


@dataclass(frozen=True)
class Projector:
    """specs(ModelConfig) -> tree; apply(params, feats [N, P, D_vision], ModelConfig, Dist) ->
    [N, tokens(P, cfg), D_llm]; tokens(P, ModelConfig) -> tokens per image out of P in."""

    specs: Callable[..., dict]
    apply: Callable[..., Any]
    tokens: Callable[[int, Any], int] = _same


@dataclass(frozen=True)
class FFN:
    """The MLP of a decoder block. specs(LLMConfig, std, out_std) -> tree; apply(params, x [B, T, D],
    LLMConfig, Dist, *, valid, dispatch) -> (y like x, aux, z): MoE balance and router z-losses
    (zeros for a dense MLP)."""

    specs: Callable[..., dict]
    apply: Callable[..., Any]


class Registry:
    """name -> part. ``register(name, part)`` adds one (``replace=True`` swaps an existing one);
    ``register(pattern, part, regex=True)`` answers every name the regex matches in full (e.g. the
    ``mlp{N}x_gelu`` family); ``registry[name]`` raises an error naming the config key and every
    registered name."""

    def __init__(self, key: str, kind: type):
        self.key, self.kind = key, kind
        self._named: dict[str, Any] = {}
        self._patterns: list[tuple[re.Pattern, str, Any]] = []

    def register(self, name: str, part: Any, *, regex: bool = False, replace: bool = False) -> Any:
        if not isinstance(part, self.kind):
            raise TypeError(f"{self.key}: register a {self.kind.__name__}(specs=..., apply=...), not {type(part).__name__}")
        known = name in self._named or any(src == name for _, src, _ in self._patterns)
        if known and not replace:
            raise ValueError(f"{self.key}={name!r} is already registered; pass replace=True to swap it")
        if regex:
            self._patterns = [e for e in self._patterns if e[1] != name] + [(re.compile(name), name, part)]
        else:
            self._named[name] = part
        return part

    def __contains__(self, name: str) -> bool:
        return name in self._named or any(rx.fullmatch(name) for rx, _, _ in self._patterns)

    def __getitem__(self, name: str) -> Any:
        if name in self._named:
            return self._named[name]
        for rx, _, part in self._patterns:
            if rx.fullmatch(name):
                return part
        raise ValueError(f"{self.key}={name!r} is not a registered part; registered: {', '.join(self.names())} "
                         f"(add one with neva.registry.{_NAMES.get(self.key, 'REGISTRY')}.register)")

    def names(self) -> list[str]:
        return sorted(self._named) + [src for _, src, _ in self._patterns]


ENCODERS = Registry("model.vision.kind", Encoder)
PROJECTORS = Registry("model.projector.kind", Projector)
FFNS = Registry("model.llm.mlp", FFN)
_NAMES = {"model.vision.kind": "ENCODERS", "model.projector.kind": "PROJECTORS", "model.llm.mlp": "FFNS"}
