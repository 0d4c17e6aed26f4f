"""Experiment configs: dotted overrides, type checks, closest-key suggestions, range checks, round trip."""
import pytest

from neva import experiment as X
from neva.config import ModelConfig, tiny_llm, tiny_vision
from neva.data.config import DataConfig


def base() -> X.Experiment:
    return X.Experiment(model=ModelConfig(vision=tiny_vision(), llm=tiny_llm(), image_token_id=255),
                        data=DataConfig(batch_size=8))


def test_dotted_overrides_are_typed():
    e = X.parse(["model.vision.select_layer=-1", "train.steps=200", "train.lr=1e-3", "data.template=mistral",
                 "run.dir=runs/x", "train.betas=0.9,0.99", "parallel.sp=false", "checkpoint.every=50",
                 "model.llm.sliding_window=none", "data.eval_path=null", "train.precision=bf16_o2"], base())
    assert e.model.vision.select_layer == -1 and e.train.steps == 200 and e.train.lr == 1e-3
    assert e.data.template == "mistral" and e.run.dir == "runs/x" and e.train.betas == (0.9, 0.99)
    assert e.model.llm.sliding_window is None and e.data.eval_path is None and e.checkpoint.every == 50
    e = X.override(base(), ["model.llm.rope_scaling.factor=4"])       # an optional section starts from defaults
    assert e.model.llm.rope_scaling.factor == 4.0


@pytest.mark.parametrize("arg,msg", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("model.vision.selct_layer=-1", "did you mean 'model.vision.select_layer'"),
    ("train.steps=ten", "expected an integer"),
    ("parallel.sp=maybe", "expected a bool"),
    ("train.betas=0.9", "expected 2 comma-separated values"),
    ("train", "not key=value"),
    ("model.vision=3", "is a section"),
    ("train.lr.x=3", "is a value, not a section"),
])
def test_bad_overrides_name_the_key(arg, msg):
    with pytest.raises(X.ConfigError, match=msg):
        X.parse([arg], base())


@pytest.mark.parametrize("arg,msg", [
    ("train.lr=-1e-3", "train.lr=-0.001 must be > 0"),
    ("train.grad_accum=3", "must divide data.batch_size=8"),
    ("train.precision=fp8", "train.precision='fp8'"),
    ("parallel.sp=true", "needs parallel.tp > 1"),
    ("train.freeze=(", "freeze"),
    ("data.template=nope", "data.template='nope'"),
    ("model.llm.top_k=9", "top_k=9"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1"),
    ("train.resume=/no/such/ckpt", "no such checkpoint folder"),
    ("parallel.pp_schedule=zigzag", "use gpipe or 1f1b"),
])
def test_out_of_range_values_fail_at_start(arg, msg):
    with pytest.raises(X.ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        X.parse([arg], base())


def test_func_mode_needs_no_pipeline():
    with pytest.raises(X.ConfigError, match="train.mode=func with parallel.pp > 1"):
        X.parse(["train.mode=func", "parallel.pp=2"], base(), world_size=2)


def test_plan_must_fit_world_size():
    with pytest.raises(X.ConfigError, match="does not divide the world size 2"):
        X.parse(["parallel.tp=4"], base(), world_size=2)


def test_groups_from_command_line():
    e = X.parse(["train.freeze=^vision/", "train.lr_mults=^projector/=0.1"], base())
    gs = e.train.optimizer_groups()
    assert [(g.pattern, g.frozen, g.lr_mult) for g in gs] == [("^vision/", True, 1.0), ("^projector/", False, 0.1)]


def test_resolved_config_round_trips(tmp_path):
    e = X.parse(["train.steps=7", "train.betas=0.8,0.9", "model.llm.rope_scaling.factor=2"], base())
    X.save(e, tmp_path)
    assert X.load(tmp_path) == e


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        X.parse(["--help"], base())
    out = capsys.readouterr().out
    assert "train.precision=fp32" in out and "model.vision.select_layer=" in out and "data.template=" in out


def test_help_describes_every_key():
    """Every key of the main job's experiment has a one-line description (the comment after its field),
    and the values it takes; enumerated values are all named where the validators define them."""
    import sys
    from pathlib import Path

    from neva import overrides
    from neva.data.config import IMAGE_MODES, ON_BAD, PACKING_ALGOS
    from neva.data.templates import TEMPLATES
    from neva.parallel.pipeline import SCHEDULES
    from neva.train.precision import NAMES
    from neva.train.remat import METHODS
    from neva.train.step import MODES
    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    import siglip_mixtral as job
    rows = overrides.entries(job.base())
    assert len(rows) > 100 and {e.key for e in rows} >= set(overrides.keys(job.base()))
    undocumented = [e.key for e in rows if not e.doc.strip()]
    assert not undocumented, f"add a # comment after these fields: {undocumented}"
    assert all(e.kind for e in rows)
    doc = {e.key: e.doc for e in rows}
    for key, allowed in [("train.precision", NAMES), ("train.remat", METHODS), ("train.mode", MODES),
                         ("parallel.pp_schedule", SCHEDULES), ("data.template", TEMPLATES),
                         ("data.image_mode", IMAGE_MODES), ("data.packing_algorithm", PACKING_ALGOS),
                         ("data.on_bad_sample", ON_BAD)]:
        missing = [v for v in allowed if v not in doc[key]]
        assert not missing, f"{key}'s comment does not name {missing}"


def test_help_for_one_section(capsys):
    with pytest.raises(SystemExit):
        X.parse(["--help", "parallel"], base(), usage="usage: job.py [--recipe R]")
    out = capsys.readouterr().out
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    assert keys[:2] == ["parallel.tp=1", "parallel.pp=1"] and len(keys) == 8   # tp pp ep sp pp_schedule zero1 cp vision
    assert all(k.startswith("parallel.") for k in keys) and "usage: job.py [--recipe R]" in out
    assert "true | false" in out and "tensor parallel" in out
    with pytest.raises(X.ConfigError, match="did you mean 'parallel'"):
        X.parse(["--help=paralel"], base())


def test_field_comments_are_read_from_the_source():
    from dataclasses import dataclass

    from neva import overrides

    @dataclass(frozen=True)
    class Inner:
        """An inner section."""

        a: int = 1          # the a
        b: str = "x"        # the b, whose comment
        #                     goes on
        c: float | None = None

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()   # ignored: the section's docstring says it
        d: tuple[int, ...] = (1, 2)  # some ints

    rows = {e.key: e for e in overrides.entries(Outer())}
    assert rows["inner"].is_section and rows["inner"].doc == "An inner section."
    assert rows["inner.a"].doc == "the a" and rows["inner.a"].kind == "int" and rows["inner.a"].value == "1"
    assert rows["inner.b"].doc == "the b, whose comment goes on"
    assert rows["inner.c"].doc == "" and rows["inner.c"].kind == "float | none"
    assert rows["d"].kind == "int,..." and rows["d"].value == "1,2"
