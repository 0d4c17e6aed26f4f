"""Distributed checkpoints: written under one layout, resumed under another (or in one process
without a process group), the following three steps (on batches none of the first two used) have an
uninterrupted run's losses, also along one axis (tp2 -> tp4, pp2 -> pp4, ep2 -> pp2 x tp2); an export
holds exactly the params of the run that wrote the checkpoint; a corrupt shard is an error naming it,
and train.resume=auto falls back to the newest intact checkpoint."""
import functools

import pytest

from neva import model
from neva.parallel.plan import Layout
from neva.testing import GlooPool
from neva.testing.runs import train_segment
from neva.train import checkpoint as ckpt
from test_parallel_gloo import _batch, _main_like_cfg

N, M = 2, 3  # steps before and after the switch


@pytest.fixture(scope="module")
def gloo_pool2():
    pool = GlooPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def run_data():
    cfg = _main_like_cfg()
    return cfg, model.init_params(cfg, 2), [_batch(seed=s) for s in range(N + M)]


@pytest.fixture(scope="module")
def uninterrupted(run_data, tmp_path_factory):
    cfg, params, batches = run_data
    losses = train_segment(None, None, cfg, params, batches, 0, N + M, str(tmp_path_factory.mktemp("ref")))
    assert len(set(losses)) == N + M
    return losses


@pytest.fixture(scope="module")
def saved_tp2pp2(gloo_pool, run_data, tmp_path_factory):
    cfg, params, batches = run_data
    d = tmp_path_factory.mktemp("tp2pp2")
    first, gathered = gloo_pool.run(functools.partial(train_segment, with_params=True), Layout(tp=2, pp=2), cfg, params,
                                    batches, 0, N, str(d))[0]
    return d, first, gathered


def test_tp2pp2_then_dp2(gloo_pool2, run_data, uninterrupted, saved_tp2pp2, tmp_path):
    import shutil
    cfg, params, batches = run_data
    d = tmp_path / "copy"
    shutil.copytree(saved_tp2pp2[0], d)
    first = saved_tp2pp2[1]
    assert ckpt.check_complete(ckpt.latest(d))["layout"] == "pp2xtp2"
    assert first == pytest.approx(uninterrupted[:N], rel=1e-5)
    rest = gloo_pool2.run(train_segment, Layout(dp=2), cfg, params, batches, N, N + M, str(d))[0]
    assert rest == pytest.approx(uninterrupted[N:], rel=1e-5)


def test_tp2pp2_then_single_process(run_data, uninterrupted, saved_tp2pp2, tmp_path):
    import shutil
    cfg, params, batches = run_data
    d = tmp_path / "copy"
    shutil.copytree(saved_tp2pp2[0], d)
    rest = train_segment(None, None, cfg, params, batches, N, N + M, str(d))
    assert rest == pytest.approx(uninterrupted[N:], rel=1e-5)


def test_single_process_then_ep2_tp2_sp(gloo_pool, run_data, uninterrupted, tmp_path):
    cfg, params, batches = run_data
    first = train_segment(None, None, cfg, params, batches, 0, N, str(tmp_path))
    rest = gloo_pool.run(train_segment, Layout(tp=2, ep=2, sp=True), cfg, params, batches, N, N + M, str(tmp_path))[0]
    assert first + rest == pytest.approx(uninterrupted, rel=1e-5)


def test_zero1_checkpoints_resume_without_it_and_back(gloo_pool, gloo_pool2, run_data, uninterrupted, tmp_path):
    """ZeRO-1 state (each leaf's moments on one dp rank) written under dp2 x tp2 resumes in one
    process; a single-process checkpoint resumes under dp2 with ZeRO-1; both continue the same run."""
    cfg, params, batches = run_data
    a, b = tmp_path / "a", tmp_path / "b"
    first = gloo_pool.run(train_segment, Layout(dp=2, tp=2), cfg, params, batches, 0, N, str(a), 2, 1e-3, True)[0]
    assert first == pytest.approx(uninterrupted[:N], rel=1e-5)
    assert train_segment(None, None, cfg, params, batches, N, N + M, str(a)) == pytest.approx(uninterrupted[N:], rel=1e-5)
    train_segment(None, None, cfg, params, batches, 0, N, str(b))
    rest = gloo_pool2.run(train_segment, Layout(dp=2), cfg, params, batches, N, N + M, str(b), 2, 1e-3, True)[0]
    assert rest == pytest.approx(uninterrupted[N:], rel=1e-5)


@pytest.mark.parametrize("before,after", [(Layout(tp=2), Layout(tp=4)), (Layout(pp=2), Layout(pp=4)),
                                          (Layout(ep=2), Layout(pp=2, tp=2))], ids=str)
def test_reshard_along_an_axis(gloo_pool, gloo_pool2, run_data, uninterrupted, tmp_path, before, after):
    """Two steps on 2 ranks, then three more on 4 from its checkpoint: the losses are the
    uninterrupted run's (the checkpoint's slices are cut anew for twice the shards)."""
    cfg, params, batches = run_data
    first = gloo_pool2.run(train_segment, before, cfg, params, batches, 0, N, str(tmp_path))[0]
    assert ckpt.check_complete(ckpt.latest(tmp_path))["layout"] == str(before)
    rest = gloo_pool.run(train_segment, after, cfg, params, batches, N, N + M, str(tmp_path))[0]
    assert first + rest == pytest.approx(uninterrupted, rel=1e-5)


def test_corrupt_shard_is_named_and_skipped(run_data, tmp_path):
    cfg, params, batches = run_data
    train_segment(None, None, cfg, params, batches, 0, 1, str(tmp_path))
    train_segment(None, None, cfg, params, batches, 1, 2, str(tmp_path))
    newest = ckpt.latest(tmp_path)
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                       # same size, one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"{shard.name} does not match its checksum"):
        ckpt.resolve(str(newest), tmp_path)
    assert ckpt.resolve("auto", tmp_path).name == "step_00000001"   # falls back to the intact one


def test_export_of_a_sharded_checkpoint_loads_in_transformers(saved_tp2pp2, run_data, tmp_path):
    """python -m neva.export on a checkpoint written by 4 ranks (tp2 x pp2): the folder holds exactly
    the params those ranks held (gathered from them, not read back through the same loader), and
    transformers gives the logits neva gives with them."""
    import shutil
    import torch
    from transformers import LlavaForConditionalGeneration
    from neva import experiment as X
    from neva import export as E
    from neva import hf
    from neva.params import flatten
    cfg, params, batches = run_data
    d = tmp_path / "run"
    shutil.copytree(saved_tp2pp2[0], d)
    X.save(X.Experiment(model=cfg), d)
    assert E.main([str(ckpt.latest(d)), str(tmp_path / "hf")]) == 0
    _, ours = hf.load(str(tmp_path / "hf"))
    written, gathered = flatten(ours), flatten(saved_tp2pp2[2])       # what the 4 ranks held at the save
    assert written.keys() == gathered.keys() and all(torch.equal(written[k], gathered[k]) for k in written)
    b = batches[0]
    hf_model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        theirs = hf_model(input_ids=b["input_ids"], pixel_values=b["pixel_values"]).logits
        mine = model.forward(ours, cfg, b)["logits"]
    assert (theirs - mine).abs().max() < 1e-4
    assert not torch.equal(ours["llm"]["embed"]["w"], params["llm"]["embed"]["w"])   # it did train


def test_export_errors_name_the_problem(tmp_path, capsys):
    from neva import export as E
    assert E.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope does not exist: pass a run folder" in capsys.readouterr().err
    (tmp_path / "run/checkpoints/step_00000001").mkdir(parents=True)
    assert E.main([str(tmp_path / "run/checkpoints/step_00000001"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_hf_folder_loads_under_a_plan_reading_only_each_ranks_slices(gloo_pool, tmp_path):
    """neva.hf.load(shard=par.hf_slices): each rank reads its tp/ep slices of its own stage's leaves
    (embeddings whole, for vocabulary growth), and the result equals the shard of a full load."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MixtralConfig, SiglipVisionConfig
    from neva.testing.runs import hf_sliced_load
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=16, patch_size=8, vision_use_head=False)
    tc = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=63,
                                              vision_feature_select_strategy="full")).save_pretrained(tmp_path)
    res = gloo_pool.run(hf_sliced_load, Layout(tp=2, pp=2), str(tmp_path))
    assert all(r["same"] for r in res)
    assert all(r["read"] < 0.5 * r["full"] for r in res), [(r["read"], r["full"]) for r in res]


KILL_SCRIPT = '''
import os, sys, time, torch
sys.path.insert(0, os.environ["HELPERS"])
from dataclasses import replace
from neva import experiment as X
from neva.train import checkpoint as C, loop
from train_helpers import Source, params, tiny_cfg

orig = C.dcp.save
def slow_save(sd, checkpoint_id):          # the test kills us inside the save of step PAUSE_AT
    orig(sd, checkpoint_id=checkpoint_id)
    if checkpoint_id.endswith(f"step_{int(os.environ.get('PAUSE_AT', -1)):08d}"):
        open(os.environ["MARKER"], "w").close()
        time.sleep(60)
C.dcp.save = slow_save

cfg = tiny_cfg()
exp = X.parse(sys.argv[1:], X.Experiment(model=cfg))
loop.train(replace(exp, train=replace(exp.train, warmup=1, lr=3e-3)), params(cfg), Source(cfg, first_seed=1))
'''


def test_kill_during_a_save_loses_at_most_one_interval(tmp_path):
    """kill -9 while step 3's checkpoint is half written: the torn folder is never loaded, resume
    starts from step 2 and the losses from there equal an uninterrupted run's."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    script = tmp_path / "kill_script.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, HELPERS=str(Path(__file__).parent), OMP_NUM_THREADS="1", MARKER=str(tmp_path / "in_save"))
    base = [sys.executable, str(script), "run.progress=false", "run.tensorboard=false", "train.steps=5",
            "checkpoint.every=1", "checkpoint.keep_last=0"]
    subprocess.run(base + [f"run.dir={tmp_path / 'a'}"], env=env, check=True, capture_output=True, timeout=300)
    p = subprocess.Popen(base + [f"run.dir={tmp_path / 'b'}"], env=dict(env, PAUSE_AT="3"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not (tmp_path / "in_save").exists():
        assert p.poll() is None, p.stdout.read().decode()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = tmp_path / "b" / "checkpoints"
    assert (ck / ".tmp-step_00000003").exists() and not (ck / "step_00000003").exists()
    assert ckpt.latest(ck).name == "step_00000002"
    out = subprocess.run(base + [f"run.dir={tmp_path / 'b'}", "train.resume=auto"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "at step 2" in out.stdout, out.stdout + out.stderr

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5]
    assert [b[s] for s in range(1, 6)] == pytest.approx([a[s] for s in range(1, 6)], rel=1e-6)


def test_frozen_base_is_left_out_and_checked(tmp_path):
    """With frozen leaves (a projector-pretraining stage) checkpoints store only what trains and the
    base's hash; resuming on another base, or with none, is an error naming the recorded sources."""
    import torch
    from neva.params import flatten
    from neva.train import optim
    from neva.train import step as S
    from train_helpers import batch, params, tiny_cfg
    cfg = tiny_cfg()
    opt = optim.AdamW(lr=1e-3, groups=(optim.Group(r"^(vision|llm)/", frozen=True),))
    setup = S.StepSetup(cfg, opt)
    base = params(cfg)
    st = S.init_state({k: v for k, v in base.items()}, setup)
    frozen = ckpt.frozen_info(base, st.trainable, {"vision": "/models/siglip", "llm": "/models/mixtral"})
    S.train_step(st, [batch(cfg)], setup)
    path = ckpt.save(tmp_path, 1, st, frozen=frozen)
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert not any(k.startswith(("params/vision/", "params/llm/")) for k in keys)
    assert any(k.startswith("params/projector/") for k in keys)
    fresh = S.init_state(params(cfg), setup)                          # the same base: fine
    ckpt.load(path, fresh, frozen=frozen)
    assert torch.equal(flatten(fresh.params)["projector/fc1/w"], flatten(st.params)["projector/fc1/w"])
    other = params(cfg, seed=5)
    changed = ckpt.frozen_info(other, st.trainable, {"vision": "/models/other", "llm": "/models/mixtral"})
    with pytest.raises(ckpt.CheckpointError, match="/models/siglip"):
        ckpt.load(path, S.init_state(other, setup), frozen=changed)
    with pytest.raises(ckpt.CheckpointError, match="stores only the trained leaves"):
        ckpt.load(path, S.init_state(params(cfg), setup), frozen=None)


def test_cp_checkpoints_load_under_other_layouts_and_back(gloo_pool, gloo_pool2, run_data, uninterrupted, tmp_path):
    """Written under cp2 x tp2, resumed in one process; written in one process, resumed under cp2
    (2 processes); written there, resumed under cp2 x pp2: every segment continues the same run."""
    cfg, params, batches = run_data
    a, b = tmp_path / "a", tmp_path / "b"
    first = gloo_pool.run(train_segment, Layout(cp=2, tp=2), cfg, params, batches, 0, N, str(a))[0]
    assert ckpt.check_complete(ckpt.latest(a))["layout"] == "cp2xtp2"
    assert first == pytest.approx(uninterrupted[:N], rel=1e-5)
    assert train_segment(None, None, cfg, params, batches, N, 2 * N, str(a)) == pytest.approx(uninterrupted[N:2 * N], rel=1e-5)
    train_segment(None, None, cfg, params, batches, 0, 1, str(b))
    mid = gloo_pool2.run(train_segment, Layout(cp=2), cfg, params, batches, 1, N, str(b))[0]
    rest = gloo_pool.run(train_segment, Layout(cp=2, pp=2), cfg, params, batches, N, 2 * N, str(b))[0]
    assert mid + rest == pytest.approx(uninterrupted[1:2 * N], rel=1e-5)
