"""The main job with Prismatic's fused vision backbone: a DINOv2 tower and the main job's SigLIP tower
look at every image (and video frame), each through its own preprocessing (DINOv2: ImageNet mean and
std; SigLIP: 0.5 / 0.5), and their patch features are concatenated per patch (96 + 96 = 192 wide)
before the projector. Everything else is the main job's: data, tokenizer, template, Mixtral, steps,
optimizer, evaluation (``experiments/siglip_mixtral.py``, imported, not copied).

    python experiments/fused_dino_siglip.py                                   # one command
    python experiments/fused_dino_siglip.py train.seed=1 run.dir=runs/fused_s1
    python experiments/fused_dino_siglip.py model.vision.towers.0.n_registers=0   # a tower's field: by index

The model is composition, not a new class: ``neva.config.fuse(dino, siglip)`` names the two towers
(``vision/dino/...`` and ``vision/siglip/...`` in the params, ``pixel_values["dino"]`` and
``["siglip"]`` in the batch), and the ``fused`` encoder (``neva/fused.py``) runs both. Hugging Face has
no LLaVA class for it, so this job keeps its neva checkpoints and writes no ``hf/`` folder.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import siglip_mixtral as main_job  # noqa: E402

from neva import cli  # noqa: E402
from neva import experiment as X  # noqa: E402
from neva.config import ModelConfig, VisionConfig, fuse  # noqa: E402


def dino_tower(siglip: VisionConfig) -> VisionConfig:
    """A DINOv2 (class token, 4 registers, layer scale, GELU) the size of the main job's SigLIP, on the
    same 4 x 4 grid of 8 px patches, so the towers' patches line up one to one."""
    return replace(siglip, kind="dino", act="gelu", n_registers=4)


def model_config() -> ModelConfig:
    cfg = main_job.model_config()
    return replace(cfg, vision=fuse(dino_tower(cfg.vision), cfg.vision))


def base() -> X.Experiment:
    exp = main_job.base()
    return replace(exp, model=model_config(), checkpoint=replace(exp.checkpoint, export_hf=False),
                   run=replace(exp.run, dir="runs/fused_dino_siglip"))


if __name__ == "__main__":
    cli.run(lambda argv: main_job.main(argv, base()), sys.argv[1:])   # a user's error: one line; the last good state is saved
