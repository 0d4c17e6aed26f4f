"""Every code block of README.md runs as written, in order, in one empty folder: python blocks are
executed; each shell command runs through the entry point it names (``experiments/siglip_mixtral.py``
-> the job's ``main``, ``experiments/long_video.py`` -> its ``main``, ``python -m neva.X`` -> that
module's ``main``), with TINY overrides appended to the jobs (a shrunk model, 2 steps) and their
datasets shrunk (the ``job`` fixture; 12 needle clips). A command
that cannot run here is in NOT_RUN with the reason, and is still checked as far as it can be: its keys
and values parse, and under torchrun its layout fits the model at its world size."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"
TINY = ["model.llm.dim=32", "model.llm.n_layers=2", "model.llm.ffn_dim=32", "model.llm.n_experts=4",
        "model.vision.dim=32", "model.vision.mlp_dim=64", "model.vision.n_layers=1", "data.batch_size=4",
        "data.num_workers=0", "eval.batch_size=16", "eval.max_new_tokens=4", "eval.max_samples=4",
        "train.warmup=1", "train.steps=2"]
CAPS = {"train.pretrain_steps": 1}          # step counts a command sets, capped
NOT_RUN = {                                 # pattern of a command -> why it does not run here
    r"-m venv|pip install": "installs packages",
    r"-m pytest": "the test suite itself",
    r"--recipe llava": "needs real HF folders (tests/test_train_main_job.py runs the recipe on tiny ones)",
    r"torchrun": "many processes (tests/test_train_main_job.py runs the main job under torchrun)",
    r"-m neva\.serve": "a server runs until stopped (tests/test_serve.py starts one and talks to it)",
    r"vllm serve|sglang": "vLLM and SGLang are not installed here",
    r"fused_dino_siglip\.py": "the fused job's towers do not shrink with TINY (tests/test_dino_fused.py trains, "
                              "shards and resumes the fused model)",
}
MODULES = ("neva.data.inspect", "neva.export", "neva.plan")     # python -m entry points that run
JOBS = ("siglip_mixtral.py", "long_video.py")       # experiments that run shrunk (the long video's clips too)


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block."""
    return [(m[1], m[2], text[:m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``NAME=value``
    lines remembered and ``$NAME`` expanded, ``&&`` chains split."""
    env: dict[str, str] = {}
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), line)
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            k, v = words[0].split("=", 1)
            env[k] = v
            continue
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def shrink(args: list[str]) -> list[str]:
    capped = [f"{k}={min(int(v), CAPS[k])}" for k, _, v in (a.partition("=") for a in args) if k in CAPS]
    return args + TINY + capped


def check_without_running(job, cmd: list[str]) -> None:
    """The command's overrides parse (and its plan fits its world size under torchrun)."""
    from neva import model
    from neva.parallel.plan import Layout, Plan
    script = next(i for i, w in enumerate(cmd) if w.endswith(JOBS))
    world = 1
    if "torchrun" in cmd[0]:
        opt = dict(zip(cmd[1:script], cmd[2:script]))
        world = int(opt.get("--nproc_per_node", 1)) * int(opt.get("--nnodes", 1))
    recipe, args = job.split_recipe(cmd[script + 1:])
    base = importlib.import_module("long_video").base() if cmd[script].endswith("long_video.py") else job.base()
    exp = job.X.parse(args, base, world_size=world)
    if recipe == "llava":
        exp = job.X.validate(job.llava_recipe(exp), world)
    pc = exp.parallel
    Plan(Layout.fit(world, pc.tp, pc.pp, pc.ep, pc.sp, pc.cp), towers=Plan.vision_rows(pc.vision)).validate(
        exp.model, model.specs(exp.model), world)


def run_command(job, cmd: list[str]) -> None:
    text = " ".join(cmd)
    skip = [p for p in NOT_RUN if re.search(p, text)]
    if skip:
        if any(w.endswith(JOBS) for w in cmd):
            check_without_running(job, cmd)
        if any(w.endswith("fused_dino_siglip.py") for w in cmd):    # its overrides parse against its own base
            import fused_dino_siglip
            job.X.parse(cmd[2:], fused_dino_siglip.base())
        return
    if cmd[0].endswith(("python", "python3")) and cmd[1:2] == ["-m"] and cmd[2] in MODULES:
        mod = importlib.import_module(cmd[2])
        if not hasattr(mod, "main"):                 # a package: python -m runs its __main__
            mod = importlib.import_module(cmd[2] + ".__main__")
        assert mod.main(cmd[3:]) == 0, text
    elif cmd[0].endswith(("python", "python3")) and cmd[1] == "experiments/siglip_mixtral.py":
        try:
            job.main(shrink(cmd[2:]))
        except SystemExit as e:                   # --help
            assert e.code in (0, None), text
    elif cmd[0].endswith(("python", "python3")) and cmd[1] == "experiments/long_video.py":
        metrics = importlib.import_module("long_video").main(shrink(cmd[2:]))
        assert metrics["video"]["overall"]["n"] and metrics["memory_per_rank"][0]["peak_rss_mb"] > 0, text
    else:
        raise AssertionError(f"README command {text!r}: add a way to run it here, or a NOT_RUN entry saying why not")


def test_every_readme_block_runs(job, capsys, monkeypatch):
    import long_video
    monkeypatch.setattr(long_video, "GENERATE", dict(long_video.GENERATE, n_train=8, n_eval=4))
    text = README.read_text()
    threads = torch.get_num_threads()
    seen: set[str] = set()
    try:
        for lang, code, line in blocks(text):
            if lang == "python":
                exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "__readme__"})
            elif lang == "bash":
                for cmd in commands(code):
                    seen |= {p for p in NOT_RUN if re.search(p, " ".join(cmd))}
                    run_command(job, cmd)
            else:
                assert lang == "text", f"README.md line {line}: a {lang or 'plain'} block; mark it python, bash or text"
    finally:
        torch.set_num_threads(threads)
    assert seen == set(NOT_RUN), f"NOT_RUN entries that match no README command: {set(NOT_RUN) - seen}"
    out = capsys.readouterr().out
    assert "train: step 2/2 | " in out and "train.steps=600" in out        # a log without a terminal; --help


def test_commands_are_read_like_a_shell():
    code = 'T="tr --n 4"\n# a comment\n$T a.py x=1 \\\n    y=2   # why\nA && B c\n'
    assert commands(code) == [["tr", "--n", "4", "a.py", "x=1", "y=2"], ["A"], ["B", "c"]]
    assert shrink(["train.pretrain_steps=150", "x=1"])[-1] == "train.pretrain_steps=1"


@pytest.mark.parametrize("cmd", [["torchrun", "--nproc_per_node", "4", "experiments/siglip_mixtral.py", "parallel.tp=3"],
                                 ["torchrun", "--nproc_per_node", "8", "experiments/siglip_mixtral.py", "parallel.tp=8"]])
def test_a_command_that_does_not_run_is_still_checked(job, cmd):
    """A world the layout does not divide; a layout the model does not divide (4 heads over tp=8)."""
    with pytest.raises(ValueError):
        check_without_running(job, cmd)


def test_ci_runs_the_quickstart_test_command():
    """CI runs the README's test command as written: a fresh venv, the test extra, the suite."""
    quick = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in quick.splitlines() if "pytest" in ln)
    assert line.strip() in (README.parent / ".ci" / "run").read_text(), line
