"""Fault injection: each way a run could lose work or end silently wrong (issue 12), caused on purpose,
and the one message a user then sees. Checkpoint clean-up and foreign checkpoints, exports that do
not match their config, errors and stop signals mid-run, samples that all fail, export into a used
folder, non-finite steps that are not in a row; then the messages. The 4-rank torchrun case (kills
during a save, SIGTERM to every rank) is at the end."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import Source, params, tiny_cfg

from neva import cli
from neva import experiment as X
from neva import export as E
from neva.data import DataConfig, NevaDataset
from neva.data.loader import Loader
from neva.data.tokenize import BadSample
from neva.train import checkpoint as ckpt
from neva.train import loop
from neva.train import step as S
from neva.train.metrics import read_metrics

CFG = tiny_cfg()


def _exp(run_dir, steps=4, every=2, keep_last=1, resume="auto", cfg=CFG, **train) -> X.Experiment:
    return X.Experiment(model=cfg, train=X.TrainConfig(steps=steps, warmup=1, lr=3e-3, resume=resume, **train),
                        checkpoint=X.CheckpointConfig(every=every, keep_last=keep_last, export_hf=False),
                        run=X.RunConfig(dir=str(run_dir), progress=False, tensorboard=False, threads=1))


def _state(cfg=CFG):
    exp = _exp("unused", cfg=cfg)
    return S.init_state(params(cfg), loop.make_setup(exp))


def _corrupt(path: Path) -> None:
    """Flip one byte in the middle of a checkpoint's data file (sizes stay right)."""
    f = next(p for p in path.iterdir() if p.suffix == ".distcp")
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _steps(d: Path) -> list[int]:
    return [int(p.name[len("step_"):]) for p in ckpt.complete(d)]


class Faulty(Source):
    """``Source`` batches with sample ids (``batch_ids``, as the data loader has) and a fault at chosen
    batches: NaN pixels in one sample, an exception, or a signal sent to this process."""

    def __init__(self, cfg, nan=(), fail=None, send=None, unlabelled=False, at=None):
        super().__init__(cfg)
        self.nan, self.fail, self.send, self.unlabelled, self.at = set(nan), fail, send, unlabelled, at
        self.batch_ids = []

    def __iter__(self):
        for b in super().__iter__():
            k = self.i - 1                          # this batch's index
            if k == self.at and self.fail is not None:
                raise self.fail
            if k == self.at and self.send is not None:
                os.kill(os.getpid(), self.send)     # as Slurm or Kubernetes would, mid-run
            if k == self.at and self.unlabelled:   # no trained token: the step itself raises
                b["labels"][:] = -100
            if k in self.nan:
                b["pixel_values"][1] = float("nan")
            self.batch_ids = [f"b{k}-{r}" for r in range(b["input_ids"].shape[0])]
            yield b


# --------------------------------------------------------------------------------------------- 1
def test_a_corrupt_later_checkpoint_is_set_aside_and_never_displaces_the_new_ones(tmp_path, capsys):
    """A damaged step_10 of an earlier run: resume=auto says it skips it and why, moves it aside,
    says the run starts at step 0, and keep_last=1 then keeps this run's newest checkpoint."""
    ck = tmp_path / "checkpoints"
    _corrupt(ckpt.save(ck, 10, _state()))
    loop.train(_exp(tmp_path, steps=2, every=1), params(CFG), Faulty(CFG))
    out = capsys.readouterr().out
    assert _steps(ck) == [2]
    assert "skipping" in out and "step_00000010: file" in out and "does not match its checksum" in out
    assert (ck / "set_aside" / "step_00000010").is_dir() and "moved" in out and "starts at step 0" in out


def test_clean_up_keeps_the_new_checkpoint_and_counts_only_intact_ones(tmp_path, capsys):
    st = _state()
    for s in (1, 2):
        ckpt.save(tmp_path, s, st)
    _corrupt(tmp_path / "step_00000002")
    ckpt.save(tmp_path, 3, st, keep_last=2)                  # keeps 3 and the newest intact one, 1
    assert _steps(tmp_path) == [1, 3] and "removing damaged checkpoint" in capsys.readouterr().out
    ckpt.save(tmp_path, 9, st)                               # another run's, later than ours
    ckpt.save(tmp_path, 4, st, keep_last=1)
    assert _steps(tmp_path) == [4, 9] and "later than step 4" in capsys.readouterr().out


def test_a_fresh_start_next_to_an_earlier_run_is_refused(tmp_path):
    """train.resume=none in a folder with an earlier run's later checkpoint: refused before anything
    is written (config.json and metrics.jsonl stay the earlier run's)."""
    ckpt.save(tmp_path / "checkpoints", 10, _state())
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match=r"holds checkpoints of an earlier run \(step_00000010\).*"
                                                   r"train.resume=auto.*another run.dir"):
        loop.train(_exp(tmp_path, resume="none"), params(CFG), Faulty(CFG))
    assert _steps(tmp_path / "checkpoints") == [10] and (tmp_path / "config.json").read_text() == "{}"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    ck, st = tmp_path / "checkpoints", _state()
    for s in range(1, 5):                                     # an earlier run's steps 1-4
        ckpt.save(ck, s, st, {"sampler": {"i": s}})
    loop.train(_exp(tmp_path, steps=3, keep_last=0, resume=str(ck / "step_00000002")), params(CFG), Faulty(CFG))
    out = capsys.readouterr().out
    assert _steps(ck) == [1, 2, 3] and sorted(p.name for p in (ck / "set_aside").iterdir()) == [
        "step_00000003", "step_00000004"]
    assert "a continuation this run replaces" in out


# --------------------------------------------------------------------------------------------- 2
@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory):
    """A 2-layer run's folder: config.json and one checkpoint, as loop.train leaves them (the tests
    only read it)."""
    run = tmp_path_factory.mktemp("run")
    loop.train(_exp(run, steps=1), params(CFG), Faulty(CFG))
    return run, ckpt.latest(run / "checkpoints")


@pytest.mark.parametrize("change,message", [
    ({"n_layers": 3}, r"\d+ missing: params/llm/layers/2/"),
    ({"n_layers": 1}, r"\d+ unexpected: params/llm/layers/1/"),
    ({"dim": 32}, r"27 of another shape: params/projector/fc1/w \(64, 48\) in the checkpoint, \(32, 48\) here"),
])
def test_export_refuses_a_checkpoint_that_does_not_match_the_config(run_with_checkpoint, tmp_path, capsys,
                                                                    change, message):
    run, last = run_with_checkpoint
    other = replace(CFG, llm=replace(CFG.llm, **change))
    X.save(X.Experiment(model=other), tmp_path)
    assert E.main([str(last), str(tmp_path / "hf"), "--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "does not fit this model" in err and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "hf").exists()


def test_a_resume_that_does_not_fit_leaves_config_json_alone(run_with_checkpoint):
    run, _ = run_with_checkpoint
    three = replace(CFG, llm=replace(CFG.llm, n_layers=3))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        loop.train(_exp(run, steps=2, cfg=three), params(three), Faulty(three))
    assert X.load(run).model.llm.n_layers == 2


# --------------------------------------------------------------------------------------------- 5
def test_export_into_a_used_folder_needs_overwrite_and_keeps_what_it_does_not_write(run_with_checkpoint,
                                                                                  tmp_path, capsys):
    run, last = run_with_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_backup.safetensors").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors.index.json").write_text("{}")          # an earlier sharded export's index
    assert E.main([str(last), str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and not (out / "config.json").exists()
    assert E.main([str(last), str(out), "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} == {"model_backup.safetensors", "notes.txt", "config.json",
                                                "model.safetensors"}
    assert (out / "model_backup.safetensors").read_bytes() == b"mine"


# --------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("where", ["fetch", "step"])
def test_an_error_mid_run_saves_the_last_good_state(tmp_path, capsys, where):
    """Any exception in the loop (from the data, from the step) ends the run after checkpointing the
    steps done, with checkpoint.every far away."""
    fail = RuntimeError("disk went away") if where == "fetch" else None
    src = Faulty(CFG, fail=fail, unlabelled=where == "step", at=2)
    with pytest.raises((RuntimeError, ValueError), match="disk went away|hold no label tokens"):
        loop.train(_exp(tmp_path, steps=6, every=100), params(CFG), src)
    assert _steps(tmp_path / "checkpoints") == [2]
    meta = ckpt.load(tmp_path / "checkpoints" / "step_00000002", _state())
    assert meta["sampler"] == {"i": 2}                  # the failed batch is not counted as seen
    assert "the last good state (step 2) is in" in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_last_finished_step_and_exits(tmp_path, capsys, sig):
    """The signal comes while step 3's batch is read: step 2 is saved with the data position after
    batch 2, and the run exits with 128 + the signal (the 4-rank test resumes such a run)."""
    with pytest.raises(loop.Stopped) as stop:
        loop.train(_exp(tmp_path / "b", steps=4, every=100), params(CFG), Faulty(CFG, send=sig, at=2))
    assert stop.value.code == 128 + sig and stop.value.step == 2
    assert f"stopped by {sig.name} at step 2" in capsys.readouterr().out
    assert _steps(tmp_path / "b" / "checkpoints") == [2]
    saved = ckpt.load(tmp_path / "b" / "checkpoints" / "step_00000002", _state())
    assert saved["sampler"] == {"i": 2}                 # batch 3, read when the signal came, counts as unseen


# --------------------------------------------------------------------------------------------- 6
def test_non_finite_steps_not_in_a_row_are_named_counted_and_capped(tmp_path, capsys):
    """One sample with NaN pixels every other batch: each skipped step is printed with its batch's
    sample ids and counted; past train.max_bad_fraction the run stops with the last good state saved."""
    with pytest.raises(S.NonFiniteLoss, match=r"2 of 4 steps .* more than train.max_bad_fraction=0.1 .*\(1\)"):
        loop.train(_exp(tmp_path, steps=10, every=100, max_bad_fraction=0.1), params(CFG), Faulty(CFG, nan=(1, 3)))
    out = capsys.readouterr().out
    assert "step 2 skipped: the loss (nan)" in out and "its samples: b1-0, b1-1, b1-2, b1-3" in out
    assert "step 4 skipped" in out and "1 of 2 steps skipped so far" in out
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [0, 1, 1, 2]
    assert _steps(tmp_path / "checkpoints") == [4]


# --------------------------------------------------------------------------------------------- 4
def _png(path: Path, size=24, seed=0, truncate=False) -> None:
    """A noise PNG (incompressible); ``truncate``: its body cut in half, the header intact."""
    a = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _records(folder: Path, n: int, bad=(), name="d.jsonl") -> Path:
    rows = []
    for i in range(n):
        _png(folder / f"{i}.png", seed=i, truncate=i in bad)
        rows.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]})
    p = folder / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _loader(path, **kw) -> Loader:
    from data_helpers import tiny_model
    cfg = DataConfig(**{"data_path": str(path), "eval_path": None, "batch_size": 2, "shuffle": False, "num_workers": 0,
                        **kw})
    ds = NevaDataset(cfg, tiny_model())
    return Loader(ds, cfg)


def test_skip_stops_with_the_first_bad_samples_when_every_sample_fails(tmp_path):
    """Every image's body is cut short (the scan, which reads headers only, passes them): the loader
    stops past data.max_skip_fraction naming the first bad samples, instead of skipping forever."""
    loader = _loader(_records(tmp_path, 6, bad=range(6)), on_bad_sample="skip")

    class Hung(BaseException):              # not an OSError, which the loader would take for a bad sample
        pass

    def too_long(*_):
        raise Hung("the loader kept skipping and never stopped")
    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(30)
    try:
        with pytest.raises(BadSample, match=r"2 of 6 samples could not be used, more than data.max_skip_fraction="
                                            r"0.01 allows \(1\); the first: sample 's0'.*0.png.*\| sample 's1'"):
            next(iter(loader))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_skipped_sample_is_logged_once_and_counted(tmp_path, caplog):
    loader = _loader(_records(tmp_path, 4, bad=[2]), on_bad_sample="skip", max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="neva.data"):
        it = iter(loader)
        [next(it) for _ in range(6)]                    # three epochs
    assert sum("sample 's2'" in r.message for r in caplog.records) == 1
    assert len(loader.skipped) == 1 and loader.stats["skipped"] == 3
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import siglip_mixtral as job

    from neva.parallel import runtime
    assert job.skipped_samples([loader], runtime.setup(CFG)) == 1


def test_a_sample_that_fails_in_a_worker_is_one_message_and_the_run_resumes_at_it(tmp_path, capsys):
    """on_bad_sample=error: a body cut short is found by a worker process at step 2; the run saves
    step 1 and raises the sample's message alone (not the worker's traceback); resuming meets it again."""
    from data_helpers import tiny_model
    path = _records(tmp_path, 4, bad=[2])
    data = DataConfig(data_path=str(path), eval_path=None, batch_size=1, shuffle=False, num_workers=1)
    model_cfg = tiny_model()
    exp = replace(_exp(tmp_path / "run", steps=4, every=100, cfg=model_cfg), data=data)
    for _ in range(2):
        loader = Loader(NevaDataset(data, model_cfg), data)
        with pytest.raises(BadSample) as e:
            loop.train(exp, params(model_cfg), loader)
        assert str(e.value).startswith("sample 's2' (d.jsonl:3): image file") and "Traceback" not in str(e.value)
    out = capsys.readouterr().out
    assert "error at step 3: the last good state (step 2)" in out and "resumed from" in out


# ------------------------------------------------------------------------------------- messages
def test_a_users_error_is_one_line_once_and_debug_shows_the_traceback(capsys, monkeypatch):
    def main(argv):
        raise BadSample("sample 'x' (d.jsonl:3): image file a.png cannot be decoded")
    for argv, env, shown in (([], {}, True), ([], {"RANK": "1"}, False)):
        monkeypatch.delenv("NEVA_DEBUG", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err == ("error: sample 'x' (d.jsonl:3): image file a.png cannot be decoded\n" if shown else "")
    with pytest.raises(BadSample):
        cli.run(main, ["--debug"])
    monkeypatch.setenv("NEVA_DEBUG", "1")
    with pytest.raises(BadSample):
        cli.run(main, [])


def test_the_main_jobs_errors_are_one_line(capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import siglip_mixtral as job
    monkeypatch.delenv("NEVA_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")                # what torchrun sets: the layout is checked against it
    for argv, message in ((["train.step=3"], "did you mean 'train.steps'"),
                          (["parallel.tp=3"], "world size 4\n  layouts that fit 4 processes: dp2xtp2"),
                          (["train.pretrain_steps=2", "train.pretrain_template=llava"],
                           "train.pretrain_template='llava' is not a known template")):
        with pytest.raises(SystemExit):
            cli.run(job.main, argv)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_hf_files_that_do_not_read_are_named(tmp_path):
    from neva import hf
    from neva.hf.io import Checkpoint
    (tmp_path / "config.json").write_text('{"model_type": "llava", ')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text('["llava"]')
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        hf.load(str(tmp_path))
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(.*\): it is trunc"):
        with Checkpoint(str(tmp_path)):
            pass


def test_resume_auto_says_which_checkpoints_it_skips_and_why(tmp_path, capsys):
    st = _state()
    for s in (1, 2, 3):
        ckpt.save(tmp_path, s, st)
    (tmp_path / "step_00000003" / ckpt.MANIFEST).unlink()
    _corrupt(tmp_path / "step_00000002")
    assert ckpt.resolve("auto", tmp_path).name == "step_00000001"
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("step_00000003: it has no manifest.json: it was interrupted while being written")
    assert "step_00000002: file" in out[1] and out[1].endswith("does not match its checksum: the checkpoint is corrupt")


def test_a_16_bit_png_keeps_its_shades(tmp_path):
    from neva.data import images
    a = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)    # 0 .. 65472
    Image.fromarray(a).save(tmp_path / "g16.png")
    got = np.asarray(images.open_image(tmp_path / "g16.png"))
    assert got.shape == (32, 32, 3) and np.abs(got[..., 0].astype(int) - np.rint(a / 257)).max() == 0


def test_an_empty_data_file_in_a_list_warns(tmp_path, caplog):
    good = _records(tmp_path, 2)
    (tmp_path / "empty.jsonl").write_text("")
    with caplog.at_level(logging.WARNING, logger="neva.data"):
        _loader(f"{good},{tmp_path / 'empty.jsonl'}")
    assert any(f"data file {tmp_path / 'empty.jsonl'} holds no records" in r.message for r in caplog.records)


def test_a_new_batch_size_resumes_at_the_same_sample_or_is_an_error(tmp_path):
    path = _records(tmp_path, 12)
    old = _loader(path, batch_size=2)
    it = iter(old)
    seen = [next(it)["input_ids"] for _ in range(2)]            # 4 samples of the epoch
    assert len(seen) == 2
    state = old.state_dict()
    four = _loader(path, batch_size=4)
    four.load_state_dict(state)                                # 4 seen = 1 batch of 4: continues at sample 4
    assert four.state.step == 1 and four.sampler.batch(0, 1) == [4, 5, 6, 7]
    three = _loader(path, batch_size=3)
    with pytest.raises(ValueError, match=r"4 samples into epoch 0 with 2 rows per step.*data.batch_size=2"):
        three.load_state_dict(state)


# ---------------------------------------------------------------------------- 4 ranks, torchrun
TORCHRUN_SCRIPT = '''
import os, sys, time
sys.path.insert(0, os.environ["HELPERS"])
from dataclasses import replace
from neva import experiment as X
from neva.parallel import runtime
from neva.testing.checks import data_shard
from neva.train import checkpoint as C, loop
from train_helpers import Source, params, tiny_cfg

rank, out = int(os.environ.get("RANK", 0)), os.environ["OUT"]
open(f"{out}/pid{rank}", "w").write(str(os.getpid()))
if os.environ.get("PAUSE"):                   # STEP:RANKS: those ranks sleep inside the save of STEP
    at, ranks = os.environ["PAUSE"].split(":")
    orig = C.dcp.save
    def slow_save(sd, checkpoint_id):
        orig(sd, checkpoint_id=checkpoint_id)
        if checkpoint_id.endswith(f"step_{int(at):08d}") and str(rank) in ranks.split(","):
            open(f"{out}/in_save{rank}", "w").close()
            time.sleep(120)
    C.dcp.save = slow_save
cfg = tiny_cfg()
exp = X.parse(sys.argv[1:], X.Experiment(model=cfg), world_size=int(os.environ.get("WORLD_SIZE", 1)))
exp = replace(exp, train=replace(exp.train, warmup=1, lr=3e-3))
par = runtime.setup(cfg, exp.parallel.tp)
slow = os.environ.get("SLOW_AFTER")

class Shard(Source):                          # this data rank's rows of each global batch
    def __iter__(self):
        for b in super().__iter__():
            yield data_shard(par, cfg, b) if not par.single else b

loop.run(exp, params(cfg), lambda st: Shard(cfg, first_seed=1, slow_after=int(slow) if slow else None), par=par)
'''


def test_four_ranks_killed_during_a_save_then_preempted_lose_at_most_one_interval(tmp_path):
    """torchrun, 4 ranks (tp2 x dp2), a checkpoint every step: one rank killed inside the save of step
    2, then every process killed inside the save of step 3, then SIGTERM to every rank (checkpoints
    now every 100 steps) while it reads step 5's batch. Each time the newest checkpoint that loads is
    the last finished one and torn ones never load; resumed in one process, the run ends with the
    losses of an uninterrupted one (within the drift of tp2 against one process, 2e-4 here; a batch
    lost or seen twice moves them by 1e-2)."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    run, ck = tmp_path / "b", tmp_path / "b" / "checkpoints"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(script),
            f"run.dir={run}", "run.progress=false", "run.tensorboard=false", "train.steps=6", "parallel.tp=2",
            "checkpoint.keep_last=0"]
    env = dict(os.environ, HELPERS=str(Path(__file__).parent), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def launch(*args, **extra):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        out.mkdir()
        p = subprocess.Popen(base + list(args), env=dict(env, OUT=str(out), **extra), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        return p, out

    def wait_for(p, ready, what):
        t0 = time.time()
        while not ready():
            assert p.poll() is None, f"the run ended before {what}:\n" + p.stdout.read()[-3000:]
            assert time.time() - t0 < 300, f"no {what} after 300 s"
            time.sleep(0.1)

    def pids(out):
        return [int((out / f"pid{r}").read_text()) for r in range(4)]

    p, out = launch("checkpoint.every=1", PAUSE="2:1")
    wait_for(p, lambda: (out / "in_save1").exists(), "rank 1 inside the save of step 2")
    os.kill(pids(out)[1], signal.SIGKILL)
    log = p.communicate(timeout=180)[0]
    assert p.returncode != 0 and (ck / ".tmp-step_00000002").exists(), log[-3000:]
    assert ckpt.latest(ck).name == "step_00000001"

    p, out = launch("checkpoint.every=1", PAUSE="3:0,1,2,3")
    wait_for(p, lambda: all((out / f"in_save{r}").exists() for r in range(4)), "every rank inside the save of step 3")
    for pid in pids(out) + [p.pid]:
        os.kill(pid, signal.SIGKILL)
    log = p.communicate(timeout=60)[0]
    assert "resumed from" in log and "at step 1" in log, log[-3000:]
    assert ckpt.latest(ck).name == "step_00000002" and (ck / ".tmp-step_00000003").exists()

    p, out = launch("checkpoint.every=100", SLOW_AFTER="4")
    wait_for(p, lambda: any(r["step"] == 4 for r in read_metrics(run)), "step 4")
    for pid in pids(out):
        os.kill(pid, signal.SIGTERM)
    log = p.communicate(timeout=180)[0]
    assert log.count("stopped by SIGTERM at step 4: the last good state (step 4) is in") == 1, log[-3000:]
    assert ckpt.latest(ck).name == "step_00000004"
    assert ckpt.load(ckpt.latest(ck), _state())["sampler"] == {"i": 4}      # step 5's batch, read, is not counted

    exp = X.parse(base[7:] + ["parallel.tp=1"], X.Experiment(model=CFG))
    exp = replace(exp, train=replace(exp.train, warmup=1, lr=3e-3))
    ref = replace(exp, run=replace(exp.run, dir=str(tmp_path / "ref")))
    loop.run(ref, params(CFG), lambda st: Source(CFG, first_seed=1))
    assert loop.run(exp, params(CFG), lambda st: Source(CFG, first_seed=1)).resumed_from.name == "step_00000004"
    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=2e-3)
