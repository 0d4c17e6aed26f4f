"""Configs as code, changed from the command line: dotted ``key=value`` overrides for any tree of
frozen dataclasses, JSON save and load, and the ``--help`` listing. Knows nothing of neva's sections.

    cfg = override(base, ["train.steps=200", "model.vision.select_layer=-1", "model.llm.sliding_window=none"])
    save(cfg, "runs/x/config.json"); assert load("runs/x/config.json", type(cfg)) == cfg

Values are parsed by the field's type (int, float, bool, str, None, tuples as ``a,b``); an unknown key
is an error naming the closest one. A tuple of dataclasses is indexed: ``model.vision.towers.1.select_layer=-2``.
A field typed ``Any`` may hold any dataclass: ``save`` records its class so ``load`` rebuilds it.
``help_text`` lists every key with its value, the values its type takes and the ``# comment`` written
after its field in the class (``field_docs``): that comment is the key's documentation, so write one
for every field.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import inspect
import io
import json
import shlex
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

CLASS_KEY = "_class"


class ConfigError(ValueError):
    pass


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (nested dataclasses expanded)."""
    out = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        k = f"{prefix}{f.name}"
        out.append(k)
        if is_dataclass(v):
            out += keys(v, k + ".")
        for i, x in _items(v):
            out += keys(x, f"{k}.{i}.")
    return out


def _items(v: Any) -> list[tuple[int, Any]]:
    """The dataclasses of a tuple field, indexed (none for any other value)."""
    return list(enumerate(v)) if isinstance(v, tuple) and v and all(is_dataclass(x) for x in v) else []


def parse_value(text: str, tp: Any, key: str) -> Any:
    """``text`` as a value of type ``tp`` (``key`` names it in errors)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(text, a, key)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{key}={text!r}: cannot parse")
    if tp is Any:
        return text
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a bool (true/false)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected {'an integer' if tp is int else 'a number'}") from None
    if tp is str:
        return text
    if origin is tuple:
        parts = [p for p in text.split(",") if p != ""]
        if args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
            return tuple(parse_value(p, a, key) for p, a in zip(parts, args))
        if not args or is_dataclass(args[0]):
            raise ConfigError(f"{key} holds structured values: set it in the experiment file")
        return tuple(parse_value(p, args[0], key) for p in parts)
    if is_dataclass(tp):
        raise ConfigError(f"{key} is a section: set its fields, e.g. {key}.{fields(tp)[0].name}=...")
    raise ConfigError(f"{key}: cannot parse values of type {tp}")


def _set(cfg: Any, path: list[str], text: str, full: str, root: Any) -> Any:
    name = path[0]
    if name not in {f.name for f in fields(cfg)}:
        near = difflib.get_close_matches(full, keys(root), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown config key {full!r}{hint} (run with --help to list every key)")
    tp = _hints(type(cfg))[name]
    cur = getattr(cfg, name)
    if len(path) == 1:
        return replace(cfg, **{name: parse_value(text, tp, full)})
    items = _items(cur)
    if items and len(path) > 2:           # a tuple of sections, by index
        i = int(path[1]) if path[1].isdigit() else -1
        if not 0 <= i < len(items):
            raise ConfigError(f"{full}: {name} holds {len(items)} sections; index them 0..{len(items) - 1}")
        new = _set(cur[i], path[2:], text, full, root)
        return replace(cfg, **{name: cur[:i] + (new,) + cur[i + 1:]})
    if cur is None:                       # an optional section: start from its defaults
        cur = _optional_section(tp)
        if cur is None:
            raise ConfigError(f"{'.'.join(full.split('.')[:-len(path) + 1])} is not a section")
    if not is_dataclass(cur):
        raise ConfigError(f"{full}: {name} is a value, not a section")
    return replace(cfg, **{name: _set(cur, path[1:], text, full, root)})


def override(cfg: Any, args: list[str]) -> Any:
    """Apply ``key=value`` overrides (dotted keys) to a frozen dataclass config."""
    for a in args:
        if "=" not in a:
            raise ConfigError(f"override {a!r} is not key=value (e.g. train.steps=200)")
        k, v = a.split("=", 1)
        cfg = _set(cfg, k.strip().split("."), v.strip(), k.strip(), cfg)
    return cfg


# ------------------------------------------------------------------------------ save / load
def to_dict(cfg: Any) -> dict:
    """A JSON-able dict; dataclasses held by ``Any`` fields carry their class under ``_class``."""
    hints = _hints(type(cfg))
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out[f.name] = to_dict(v)
            if hints[f.name] is Any:
                out[f.name][CLASS_KEY] = f"{type(v).__module__}.{type(v).__qualname__}"
        else:
            out[f.name] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [to_dict(x) if is_dataclass(x) else _plain(x) for x in v]
    return v


def from_dict(cls: type, d: dict) -> Any:
    """Rebuild a dataclass from ``to_dict`` output (nested dataclasses and tuples restored)."""
    hints = _hints(cls)
    return cls(**{f.name: _restore(hints[f.name], d[f.name]) for f in fields(cls) if f.name in d})


def _restore(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, dict) and CLASS_KEY in v:
        mod, _, name = v[CLASS_KEY].rpartition(".")
        return from_dict(getattr(importlib.import_module(mod), name), {k: x for k, x in v.items() if k != CLASS_KEY})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is not type(None):
                try:
                    return _restore(a, v)
                except (TypeError, ValueError):
                    continue
        return v
    if is_dataclass(tp) and isinstance(v, dict):
        return from_dict(tp, v)
    if origin is tuple or tp is tuple:
        a0 = args[0] if args else None
        return tuple(from_dict(a0, x) if a0 is not None and is_dataclass(a0) else x for x in v)
    return v


def save(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=1, default=str))
    return path


def load(path: str | Path, cls: type) -> Any:
    return from_dict(cls, json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------ --help
def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line description: the ``# comment`` after it in the class body (base classes
    too; comment-only lines right below a field continue it). The comment is the one place it is
    written; --help reads it from the source."""
    out: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if is_dataclass(c)]):
        out.update(_own_field_docs(klass))
    return out


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):                      # no source (built at run time): no descriptions
        return {}
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        i = node.end_lineno + 1
        while text and i <= len(lines) and lines[i - 1].strip().startswith("#"):
            text.append(comments[i])
            i += 1
        if text:
            out[node.target.id] = " ".join(text)
    return out


def class_doc(cls: type) -> str:
    """The first line of a class's own docstring ("" for dataclasses' generated signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc.strip().split("\n")[0]


def to_text(v: Any) -> str:
    """A value as it is written on the command line (``parse_value`` reads it back)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ",".join(to_text(x) for x in v) if v else "()"
    text = str(v)
    return shlex.quote(text) if text else "''"


def kind(tp: Any) -> str:
    """The values a field of type ``tp`` takes, as --help shows them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        opts = " | ".join(kind(a) for a in args if a is not type(None))
        return opts + (" | none" if type(None) in args else "")
    if tp is bool:
        return "true | false"
    if tp in (int, float, str):
        return tp.__name__
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return ",".join(kind(a) for a in args)
        return "Python only" if not args or is_dataclass(args[0]) else f"{kind(args[0])},..."
    if is_dataclass(tp):
        return "section"
    return "any"


@dataclass(frozen=True)
class Entry:
    """One line of --help: a key, its value as typed, the values it takes, what it does."""

    key: str
    value: str
    kind: str
    doc: str
    section: str                                     # the section holding it ("" at the top)
    is_section: bool = False


def entries(cfg: Any, prefix: str = "") -> list[Entry]:
    """Every key of ``cfg`` with its description (sections first, then their keys, in field order;
    an optional section that is unset lists the keys it would take)."""
    hints, docs = _hints(type(cfg)), field_docs(type(cfg))
    out = []
    for f in fields(cfg):
        v, k, tp = getattr(cfg, f.name), f"{prefix}{f.name}", hints[f.name]
        sub = v if is_dataclass(v) else _optional_section(tp)
        if sub is not None:
            doc = class_doc(type(sub)) or docs.get(f.name, "")
            if v is None:
                out.append(Entry(k, "none", kind(tp), docs.get(f.name, doc), prefix[:-1]))
            out.append(Entry(k, "", type(sub).__name__, doc, prefix[:-1], is_section=True))
            out += entries(sub, k + ".")
        elif _items(v):                                  # a tuple of sections, by index
            for i, x in _items(v):
                out.append(Entry(f"{k}.{i}", "", type(x).__name__, docs.get(f.name, ""), prefix[:-1], is_section=True))
                out += entries(x, f"{k}.{i}.")
        else:
            out.append(Entry(k, to_text(v), kind(tp), docs.get(f.name, ""), prefix[:-1]))
    return out


def _optional_section(tp: Any) -> Any:
    """The defaults of the section an ``X | None`` field may hold (None if it holds no section)."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    return next((a() for a in typing.get_args(tp) if is_dataclass(a)), None)


def help_text(cfg: Any, section: str | None = None) -> str:
    """Every key (or those of ``section``: a section such as ``parallel`` or ``model.llm``, or one key)
    with its value, the values it takes and its description, grouped by section."""
    rows = entries(cfg)
    if section:
        inside = [e for e in rows if e.key == section or e.key.startswith(section + ".")]
        if not inside:
            names = [e.key for e in rows if e.is_section]
            near = difflib.get_close_matches(section, names + [e.key for e in rows], n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--help {section}: no such section or key{hint} (sections: {', '.join(names)})")
        rows = inside
    width = min(44, max(len(f"{e.key}={e.value}") for e in rows if not e.is_section))
    kw = min(16, max(len(e.kind) for e in rows if not e.is_section))
    out = []
    for e in rows:
        if e.is_section:
            out.append(f"\n{e.key} ({e.kind}): {e.doc}" if e.doc else f"\n{e.key} ({e.kind})")
        else:
            out.append(f"  {f'{e.key}={e.value}':<{width}}  {e.kind:<{kw}}  {e.doc}".rstrip())
    return "\n".join(out).lstrip("\n")
