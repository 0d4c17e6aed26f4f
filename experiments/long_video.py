"""Long video: a needle in a video (LongVA's V-NIAH idea) learned by the main job's model, in one
process or with the sequence split over context-parallel ranks.

    python experiments/long_video.py                                         # one process
    torchrun --standalone --nproc_per_node 2 experiments/long_video.py \\
        parallel.cp=2 parallel.vision=frames run.dir=runs/long_video_cp2     # the same run, cp = 2

The task (``neva.data.synthetic_video.write_needles``): clips of 32-64 frames of a grey square
drifting over a dark frame; one frame, at a random time, flashes a large shape of one of four
colours. Two questions per clip: the flash's colour (prior 0.25) and whether it came in the first
or the second half (prior 0.5). The clips are folders of PNG frames in a tar (a video given as frame
images), sampled at their own 4 fps (``data.fps=4``, every frame; ``data.max_frames=64``).

The model is the main job's (SigLIP 2 layers, mlp2x_gelu, Mixtral 4 layers x 8 experts, the 32k
Mixtral vocabulary) with each 32 px frame's 16 patch tokens average-pooled 2x2 after the projector
(``model.projector.frame_pool=2``, LLaVA-NeXT-Video's setting): 4 tokens a frame, 128-256 video
tokens a sample. Under ``parallel.cp=2`` each rank holds half of every sequence (chunks i and 3-i)
and, with ``parallel.vision=frames``, encodes half of the frames. fp32: on this CPU bf16 matmuls of
these shapes took 9x longer than fp32 (17.8 s against 2.0 s for one step of 8 samples).

Writes what the main job writes under ``run.dir`` (no HF folder: HF's LLaVA cannot pool frames), and
adds to ``metrics.json`` each rank's peak resident memory (``peak_rss_mb``; and ``rss_at_start_mb``,
what the process held before building anything).
"""
from __future__ import annotations

import json
import resource
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).parent))
import siglip_mixtral as main_job  # noqa: E402

from neva import cli  # noqa: E402
from neva import experiment as X  # noqa: E402
from neva.config import ModelConfig  # noqa: E402
from neva.data import DataConfig  # noqa: E402
from neva.data.synthetic_video import write_needles  # noqa: E402

DATA = "data/needles"
GENERATE = dict(seed=0, n_train=1200, n_eval=100, min_frames=32, max_frames=64, size=32)


def model_config() -> ModelConfig:
    cfg = main_job.model_config()
    return replace(cfg, projector=replace(cfg.projector, frame_pool=2))


def base() -> X.Experiment:
    job = main_job.base()
    data = DataConfig(data_path=f"{DATA}/needle_train.jsonl", eval_path=f"{DATA}/needle_eval.jsonl",
                      video_folder=f"{DATA}/needles.tar", tokenizer="mixtral", template="mistral",
                      fps=4.0, frame_folder_fps=4.0, max_frames=64, max_seq_len=320, batch_size=8, num_workers=1)
    return replace(job, model=model_config(), data=data, train=replace(job.train, steps=300, warmup=20, precision="fp32"),
                   eval=replace(job.eval, batch_size=25),
                   checkpoint=replace(job.checkpoint, every=200, export_hf=False),
                   run=replace(job.run, dir="runs/long_video"))


def ensure(exp: X.Experiment) -> None:
    """Write the needle clips if the job's files are absent or were written with other settings."""
    if not exp.data.data_path.startswith(DATA):
        return
    marker = Path(DATA) / "job.json"
    if marker.exists() and json.loads(marker.read_text()) == GENERATE:
        return
    Path(DATA).mkdir(parents=True, exist_ok=True)
    print(f"writing the needle clips to {DATA}/ ...")
    print("  ", write_needles(Path(DATA), progress=exp.run.progress, **GENERATE))
    marker.write_text(json.dumps(GENERATE))


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> dict:
    start = _rss_mb("VmRSS")
    metrics = main_job.main(argv, base(), ensure)
    mine = {"peak_rss_mb": round(_rss_mb("VmHWM"), 1), "rss_at_start_mb": round(start, 1)}
    ranks = [mine]
    if tdist.is_initialized():
        ranks = [None] * tdist.get_world_size()
        tdist.all_gather_object(ranks, mine)
    if not metrics:
        return {}
    metrics["memory_per_rank"] = ranks
    run_dir = Path(X.override(base(), [a for a in argv if "=" in a]).run.dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print("peak resident memory per rank: " + ", ".join(f"rank {r}: {m['peak_rss_mb']:.0f} MiB" for r, m in
                                                       enumerate(ranks)))
    return metrics


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])      # a user's error: one line (--debug: the traceback)
