"""neva: LLaVA-style vision-language models (NeMo's NeVA / VideoNeVA) in functional PyTorch."""
from neva.comm import LOCAL, Dist
from neva.config import LLMConfig, ModelConfig, ProjectorConfig, RopeScaling, VisionConfig
from neva.loss import LossTerms
from neva.model import forward, init_params, loss, loss_terms, specs

__all__ = ["LLMConfig", "ModelConfig", "ProjectorConfig", "RopeScaling", "VisionConfig", "forward",
           "init_params", "loss", "loss_terms", "specs", "Dist", "LOCAL", "LossTerms"]
