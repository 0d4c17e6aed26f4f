"""Checkpoints: 2N steps in one go == N steps, kill -9, N resumed; atomicity and clear errors."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from train_helpers import batch, max_diff, params, tiny_cfg

from neva.params import flatten
from neva.train import checkpoint as ckpt
from neva.train import optim
from neva.train import step as S
from neva.train.metrics import read_metrics

SCRIPT = textwrap.dedent('''
    import os, sys, torch
    sys.path.insert(0, os.environ["HELPERS"])
    from dataclasses import replace
    from neva import experiment as X
    from neva.train import loop
    from train_helpers import Source, params, tiny_cfg

    cfg = tiny_cfg()
    exp = X.parse(sys.argv[1:], X.Experiment(model=cfg))
    exp = replace(exp, train=replace(exp.train, warmup=2, lr=3e-3))
    torch.manual_seed(123)
    slow = os.environ.get("SLOW_AFTER")            # give the test time to kill us after the checkpoint
    loop.train(exp, params(cfg), Source(cfg, noise=0.1, slow_after=int(slow) if slow else None))
''')


def _run(tmp_path, run_dir, *args, env_extra=None, wait=True):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, HELPERS=str(Path(__file__).parent), OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, str(script), f"run.dir={run_dir}", "run.progress=false", "run.tensorboard=false",
           "train.grad_accum=2", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    N = 3
    _run(tmp_path, tmp_path / "a", f"train.steps={2 * N}")
    p = _run(tmp_path, tmp_path / "b", f"train.steps={2 * N}", "checkpoint.every=1", "checkpoint.keep_last=0",
             env_extra={"SLOW_AFTER": str(N + 1)}, wait=False)
    done = tmp_path / "b" / "checkpoints" / f"step_{N:08d}" / ckpt.MANIFEST
    t0 = time.time()
    while not done.exists():
        assert p.poll() is None, p.stdout.read().decode()
        assert time.time() - t0 < 120, "the first run never wrote its checkpoint"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.latest(tmp_path / "b" / "checkpoints").name == f"step_{N:08d}"
    out = _run(tmp_path, tmp_path / "b", f"train.steps={2 * N}", "train.resume=auto")
    assert "resumed from" in out.stdout and f"at step {N}" in out.stdout
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 2 * N + 1))             # the dead run's rows past N were dropped
    for s in range(1, 2 * N + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), (s, a, b)


def _state(precision="fp32"):
    cfg = tiny_cfg()
    setup = S.StepSetup(cfg, optim.AdamW(lr=1e-3), precision=precision)
    st = S.init_state(params(cfg), setup)
    S.train_step(st, [batch(cfg)], setup)
    return cfg, setup, st


@pytest.mark.parametrize("precision", ["bf16_o2", "fp16"])
def test_round_trip_restores_everything(tmp_path, precision):
    cfg, setup, st = _state(precision)
    if st.scaler:
        st.scaler.scale, st.scaler.good_steps = 1024.0, 7
    path = ckpt.save(tmp_path, 1, st, {"sampler": {"epoch": 2, "i": 5}})
    rng = torch.get_rng_state()
    fresh = S.init_state(params(cfg, seed=9), setup)
    torch.manual_seed(999)
    meta = ckpt.load(path, fresh)
    assert meta["sampler"] == {"epoch": 2, "i": 5} and meta["step"] == 1 and fresh.step == 1
    assert max_diff(flatten(st.params), flatten(fresh.params)) == 0
    for part in st.opt_state:
        if part != "step":
            assert max_diff(st.opt_state[part], fresh.opt_state[part]) == 0
    assert torch.equal(torch.get_rng_state(), rng)
    if precision == "fp16":
        assert fresh.scaler.scale == 1024.0 and fresh.scaler.good_steps == 7
    else:
        assert {v.dtype for v in fresh.opt_state["master"].values()} == {torch.float32}


def test_incomplete_or_damaged_checkpoints(tmp_path):
    cfg, setup, st = _state()
    good = ckpt.save(tmp_path, 1, st)
    torn = ckpt.save(tmp_path, 2, st)
    (torn / ckpt.MANIFEST).unlink()                          # as if killed before the manifest
    (tmp_path / ".tmp-step_00000003").mkdir()                # a save that died early
    assert ckpt.latest(tmp_path) == good and ckpt.resolve("auto", tmp_path) == good
    with pytest.raises(ckpt.CheckpointError, match="interrupted while being written"):
        ckpt.load(torn, st)
    data = next(f for f in good.iterdir() if f.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-10])                # truncated shard
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(good, st)
    assert ckpt.latest(tmp_path) is None and ckpt.resolve("none", tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve(str(tmp_path / "nope"), tmp_path)


def test_keep_last_and_mismatched_model(tmp_path):
    cfg, setup, st = _state()
    for s in range(1, 5):
        ckpt.save(tmp_path, s, st, keep_last=2)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step_00000003", "step_00000004"]
    other = tiny_cfg(layers=3)
    st3 = S.init_state(params(other), S.StepSetup(other, optim.AdamW()))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load(ckpt.latest(tmp_path), st3)


def test_loop_saves_the_last_good_state_when_losses_go_bad(tmp_path):
    from neva import experiment as X
    from neva.train import loop

    cfg = tiny_cfg()

    def batches():
        for i in range(100):
            b = batch(cfg, seed=i)
            if i >= 2:
                b["pixel_values"] = torch.full_like(b["pixel_values"], float("nan"))
            yield b

    exp = X.Experiment(model=cfg, train=X.TrainConfig(steps=10, max_bad_steps=2),
                       run=X.RunConfig(dir=str(tmp_path), progress=False, tensorboard=False, threads=1))
    with pytest.raises(S.NonFiniteLoss, match="2 steps in a row"):
        loop.train(exp, params(cfg), batches())
    last = ckpt.latest(tmp_path / "checkpoints")
    assert last is not None and last.name == "step_00000004"
    rows = read_metrics(tmp_path)
    assert [r["skipped_now"] for r in rows] == [False, False, True, True] and rows[-1]["step"] == 4
    st = S.init_state(params(cfg), loop.make_setup(exp))
    assert ckpt.load(last, st)["step"] == 4 and st.step == 2 and st.skipped == 2
