"""neva: LLaVA-style vision-language models (NeMo's NeVA / VideoNeVA) in functional PyTorch."""
from neva.config import LLMConfig, ModelConfig, ProjectorConfig, RopeScaling, VisionConfig
from neva.model import forward, init_params, loss, loss_terms, specs
from neva.parallel.comm import LOCAL, Dist

__all__ = ["LLMConfig", "ModelConfig", "ProjectorConfig", "RopeScaling", "VisionConfig", "forward",
           "init_params", "loss", "loss_terms", "specs", "Dist", "LOCAL"]
