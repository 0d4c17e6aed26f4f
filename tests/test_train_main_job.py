"""The main job end to end on a small dataset and a shrunk model: every output it promises, resume,
and the two-stage ``--recipe llava`` from HF folders made with transformers' own classes."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import siglip_mixtral as job  # noqa: E402

from neva.data import synthetic  # noqa: E402
from neva.train import checkpoint as ckpt  # noqa: E402

SMALL = ["model.llm.dim=32", "model.llm.n_layers=2", "model.llm.ffn_dim=32", "model.llm.n_experts=4",
         "model.vision.dim=32", "model.vision.mlp_dim=64", "model.vision.n_layers=1", "data.batch_size=4",
         "data.num_workers=0", "eval.batch_size=16", "eval.max_new_tokens=4", "run.progress=false",
         "train.warmup=1", "data.data_path=small/train.jsonl,small/captions.jsonl,small/video_train.jsonl",
         "data.eval_path=small/eval.jsonl,small/video_eval.jsonl", "data.video_folder=small/videos.tar",
         "train.pretrain_data=small/captions.jsonl"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic.generate("small", train_images=40, eval_images=3, train_videos=8, eval_videos=4, qa_per_image=5)
    return tmp_path


def test_main_job_writes_every_output_and_resumes(workdir, capsys):
    """Every output; without a terminal (capsys is none) progress lines for steps, data scans and
    evaluation; rerun, it resumes at the end and keeps the first run's history."""
    args = SMALL + ["train.steps=4", "train.pretrain_steps=2", "checkpoint.every=2", "eval.every=2",
                    "eval.max_samples=6", "run.dir=runs/t", "run.progress=true", "run.print_every=2"]
    m = job.main(args)
    out = capsys.readouterr().out
    steps = [ln.split(" | ")[0] for ln in out.splitlines() if ": step " in ln]
    assert steps == ["stage 1 (captions): step 2/2", "stage 2 (questions): step 2/4", "stage 2 (questions): step 4/4"]
    assert "tokens/s " in out and "ETA " in out and "step 2: held-out image_acc " in out
    assert "scan train.jsonl: sample 40/40 | " in out and "eval: question 6/6 | " in out
    assert "threads: " in out and "run.threads" in out
    assert not Path(job.DATA).exists()                      # the job's own dataset is only made when used
    run = workdir / "runs/t"
    for kind, types in (("image", {"colour", "shape", "count", "position", "yesno"}), ("video", {"motion"})):
        assert set(m[kind]["per_type"]) == types
        for block in [m[kind]["overall"], *m[kind]["per_type"].values()]:
            assert set(block) == {"accuracy", "prior", "n"} and 0 <= block["prior"] <= 1
    assert json.loads((run / "metrics.json").read_text())["image"] == m["image"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all("loss" in r for r in rows)
    assert "pretrain/lr" in rows[0] and "lr" in rows[3] and "eval/image_acc" in rows[3]
    assert {"aux", "grad_norm", "tokens_per_s", "lr"} <= set(rows[-1])
    assert (run / "loss_curve.png").stat().st_size > 1000 and any((run / "tb").iterdir())
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
    assert ckpt.latest(run / "checkpoints").name == "step_00000004"
    assert "held-out image questions:" in out and "prior" in out and "hf/" in out.splitlines()[-1]
    assert m["skipped_samples"] == 0 and m["skipped_steps"] == 0 and "skipped: 0 samples" in out
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration.from_pretrained(str(run / "hf"))
    assert hf.config.text_config.num_local_experts == 4
    from test_hf_export_folder import hf_answers_match        # the folder serves as trained (issue 14)
    assert len(hf_answers_match(run)) == 10                     # 6 image and 4 video questions
    mode = (run / "hf/config.json").stat().st_mode & 0o777
    assert (run / "hf/model.safetensors").stat().st_mode & 0o777 == mode       # safetensors alone would give 0600
    events = sorted((run / "tb").iterdir())
    # same command again: resumes at the end, trains nothing, evaluates the same model, keeps the history
    m2 = job.main(args)
    assert m2["image"] == m["image"]
    assert "resumed from" in capsys.readouterr().out
    saved = json.loads((run / "metrics.json").read_text())
    assert [s["steps"] for s in saved["segments"]] == [4, 0] and saved["segments"][0] == m["segments"][0]
    assert saved["train_seconds"] == round(sum(s["train_seconds"] for s in saved["segments"]), 1)
    assert saved["wall_seconds"] >= m["wall_seconds"]
    assert sorted((run / "tb").iterdir()) == events                             # no empty second events file


def test_resume_from_a_path_picks_its_stage(workdir, capsys):
    """train.resume=PATH in a two-stage run: a stage-1 checkpoint resumes stage 1 (stage 2 starts
    fresh after it); a stage-2 checkpoint skips stage 1 and resumes stage 2."""
    args = SMALL + ["train.steps=3", "train.pretrain_steps=2", "checkpoint.every=1", "checkpoint.keep_last=0",
                    "eval.max_samples=2", "run.dir=runs/r", "checkpoint.export_hf=false"]
    job.main(args)
    assert "hf/" not in capsys.readouterr().out.splitlines()[-1]                # checkpoint.export_hf=false
    ck = workdir / "runs/r/checkpoints"
    assert ckpt.tag_of(ck / "pretrain/step_00000001") == "pretrain" and ckpt.tag_of(ck / "step_00000002") == ""
    job.main(args + [f"train.resume={ck / 'pretrain/step_00000001'}", "run.dir=runs/r1"])
    out = capsys.readouterr().out
    assert out.count("resumed from") == 1 and "pretrain/step_00000001 at step 1" in out
    rows = [json.loads(x) for x in (workdir / "runs/r1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 5]            # stage 1's step 2, then stage 2 from 0
    job.main(args + [f"train.resume={ck / 'step_00000002'}", "run.dir=runs/r2"])
    out = capsys.readouterr().out
    assert "step_00000002 at step 2" in out and not (workdir / "runs/r2/checkpoints/pretrain").exists()
    rows = [json.loads(x) for x in (workdir / "runs/r2/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5]


def test_lora_run_exports_merged_weights(workdir, capsys):
    """A LoRA run: its hf/ folder and ``python -m neva.export`` of its checkpoint (or of the run folder:
    its newest checkpoint) hold the same merged weights (no LoRA leaves), which differ from the base
    where LoRA applies and nowhere else. A folder without checkpoints: an error saying what to pass."""
    from neva import export as E
    from neva import hf
    from neva.params import flatten
    args = SMALL + ["train.steps=2", "train.lora=attn", "train.lora_rank=4", "train.lr=1e-2", "eval.max_samples=2",
                    "run.dir=runs/lora"]
    job.main(args)
    run = workdir / "runs/lora"
    assert E.main([str(ckpt.latest(run / "checkpoints")), str(workdir / "out")]) == 0
    a, b = flatten(hf.load(str(run / "hf"))[1]), flatten(hf.load(str(workdir / "out"))[1])
    assert a.keys() == b.keys() and not any("_lora_" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    capsys.readouterr()
    assert E.main([str(run), str(workdir / "out2")]) == 0
    assert "newest complete checkpoint in " + str(run / "checkpoints") + ": step_00000002" in capsys.readouterr().out
    c = flatten(hf.load(str(workdir / "out2"))[1])
    assert all(torch.equal(b[k], c[k]) for k in b)
    (run / "checkpoints/step_00000009").mkdir()                      # an interrupted save: no manifest
    (run / "checkpoints/step_00000002/manifest.json").unlink()
    assert E.main([str(run), str(workdir / "out3")]) == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint" in err and "step_00000009  (incomplete or damaged)" in err
    assert "RUN_DIR/checkpoints/step_N" in err and not (workdir / "out3").exists()
    exp = job.X.parse(args, job.base())
    base = {k: v for k, v in flatten(E.base_params(exp)[1]).items() if "_lora_" not in k}
    changed = {k for k in base if not torch.allclose(a[k], base[k], atol=1e-7)}
    assert changed and all(k.startswith("llm/layers/") and "/attn/" in k for k in changed)


def test_bad_overrides_fail_before_anything_runs(workdir):
    with pytest.raises(job.X.ConfigError, match="did you mean 'train.steps'"):
        job.main(["train.step=3"])
    with pytest.raises(job.X.ConfigError, match="must divide data.batch_size"):
        job.main(["train.grad_accum=5"])


def test_stage_one_data_errors_name_the_pretrain_keys(workdir):
    """Stage 1 reads train.pretrain_data with train.pretrain_template: its errors say so, not data.*."""
    with pytest.raises(ValueError, match=r"stage 1 \(train.pretrain_data=small/captions.jsonl, "
                                         r"train.pretrain_template=llama_3\): template llama_3 needs"):
        job.main(SMALL + ["train.steps=1", "train.pretrain_steps=1", "train.pretrain_template=llama_3",
                          "run.dir=runs/pt", "eval.max_samples=1"])


def _tiny_hf_parts(root: Path):
    from transformers import MixtralConfig, MixtralForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from neva.data import tokenizers
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(root / "siglip")
    MixtralForCausalLM(MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=512,
                                     tie_word_embeddings=False)).save_pretrained(root / "mixtral")
    tokenizers.load("mixtral").save_pretrained(root / "mixtral")


def test_llava_recipe_from_hf_folders(workdir):
    _tiny_hf_parts(workdir)
    args = [a for a in SMALL if not a.startswith(("model.llm", "model.vision"))] + [
        "--recipe", "llava", f"model.vision.from_pretrained={workdir / 'siglip'}",
        f"model.llm.from_pretrained={workdir / 'mixtral'}", "model.vision.select_layer=-1", "train.steps=2",
        "train.pretrain_steps=2", "eval.max_samples=3", "run.dir=runs/llava"]
    m = job.main(args)
    assert m["recipe"] == "llava" and m["image"]["overall"]["n"] == 3
    from safetensors.torch import load_file
    from neva import hf
    cfg, p = hf.load(str(workdir / "runs/llava/hf"))
    assert cfg.llm.vocab_size == 32064 and cfg.image_token_id == 32000        # the image token was appended
    vis = load_file(str(workdir / "siglip/model.safetensors"))
    w = next(v for k, v in vis.items() if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(p["vision"]["layers"]["0"]["attn"]["wq"]["w"], w)     # frozen in both stages
    lm = load_file(str(workdir / "mixtral/model.safetensors"))
    assert not torch.equal(p["llm"]["layers"]["0"]["attn"]["wq"]["w"], lm["model.layers.0.self_attn.q_proj.weight"])
    rows = [json.loads(line) for line in (workdir / "runs/llava/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_llava_recipe_needs_both_folders(workdir):
    with pytest.raises(job.X.ConfigError, match="needs model.vision.from_pretrained"):
        job.main(["--recipe", "llava", "model.vision.from_pretrained=/x"])


def _torchrun(workdir, nproc, *args):
    import os
    import subprocess
    script = Path(job.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *SMALL, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_main_job_under_torchrun_and_resumed_in_another_layout(workdir):
    """torchrun with tp2 x pp2, dp2 and tp2 + sp + ep2 (2 rows per data rank, so the global batch is 4
    rows in every layout): each step's loss equals one process's on the same global batch in the
    same micro-batches, within 1e-4. One run.dir (one metrics writer, the same row format as one
    process), a checkpoint that records its layout; then resumed in one process, it carries on."""
    common = ["checkpoint.every=2", "eval.max_samples=4", "train.precision=fp32", "checkpoint.keep_last=3",
              "train.steps=2"]
    job.main(SMALL + common + ["train.grad_accum=2", "run.dir=runs/one", "checkpoint.export_hf=false"])
    one = _rows(workdir / "runs/one")
    want = [r["loss"] for r in one]
    assert len(want) == 2 and want[0] != want[1]
    out = _torchrun(workdir, 4, "parallel.tp=2", "parallel.pp=2", "train.grad_accum=2", *common, "run.dir=runs/tp")
    assert "plan pp2xtp2" in out.stdout                     # the plan summary, printed once
    run = workdir / "runs/tp"
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]              # one writer, not four
    assert set(rows[0]) == set(one[0])                      # the same format in every layout
    assert [r["loss"] for r in rows] == pytest.approx(want, rel=1e-4)
    for name, nproc, layout in (("dp2", 2, []), ("tp2sp_ep2", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"])):
        _torchrun(workdir, nproc, *layout, "data.batch_size=2", *common, "checkpoint.export_hf=false", f"run.dir=runs/{name}")
        assert [r["loss"] for r in _rows(workdir / "runs" / name)] == pytest.approx(want, rel=1e-4), name
    assert ckpt.check_complete(ckpt.latest(run / "checkpoints"))["layout"] == "pp2xtp2"
    assert (run / "metrics.json").exists() and (run / "hf" / "config.json").exists()
    job.main(SMALL + ["train.steps=3", "train.resume=auto", "train.grad_accum=2", *common[:-1], "run.dir=runs/tp"])
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_thread_choice():
    from neva.train.threads import pick_threads, thread_choice
    before = torch.get_num_threads()
    try:
        assert pick_threads(1) == (1, "run.threads=1: 1 thread") and torch.get_num_threads() == 1
        import os
        n, why = pick_threads(0)
        assert n == torch.get_num_threads() and n in (1, len(os.sched_getaffinity(0))) and "run.threads" in why
    finally:
        torch.set_num_threads(before)
    assert thread_choice(2, 1.0, 3.0, load=5.1) == (1, "the CPU is busy (load 5.1 on 2 cores): 1 thread")
    assert thread_choice(2, 1.0, 0.55, load=0.2) == (2, "2 cores, 1.8x faster than 1: 2 threads")
    assert thread_choice(2, 1.0, 0.9, load=0.2)[1].startswith("2 threads were not faster than 1 here")


def test_loss_curve_ticks_carry_numbers():
    """A loss falling from 10 to 0.43: the log axis labels 1-2-3-5 ticks in each decade, so a number
    sits within 1.5x of the final loss (matplotlib's default labels only 1 and 10 here); the axis
    label gives the final running mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neva.train import report
    rows = [{"step": i + 1, "loss": 10.0 * 0.985 ** i + 0.4} for i in range(400)]
    fig = report.loss_figure(rows, "t")
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    labelled = [t.get_position()[1] for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    final = sum(r["loss"] for r in rows[-20:]) / 20
    assert len(labelled) >= 4 and min(max(v / final, final / v) for v in labelled) <= 1.5, labelled
    assert f"{final:.3f}" in ax.get_ylabel()
    plt.close(fig)
