"""The data pipeline: LLaVA records -> NeMo templates with exact label masks -> checked tokens,
images and video frames -> (packed) batches for ``neva.loss``. See DESIGN.md section 5.

    from neva.data import DataConfig, build_loader
    loader = build_loader(DataConfig(data_path="data/synthetic/train.jsonl"), model_cfg, rank=r, world=w)
"""
from neva.data.config import DataConfig
from neva.data.dataset import NevaDataset, Sample
from neva.data.loader import Loader, build_loader, one_pass, padding_report
from neva.data.records import Record
from neva.data.sampler import ResumableSampler, SamplerState
from neva.data.tokenize import BadSample

__all__ = ["DataConfig", "NevaDataset", "Sample", "Loader", "build_loader", "one_pass", "padding_report", "Record",
           "ResumableSampler", "SamplerState", "BadSample"]
