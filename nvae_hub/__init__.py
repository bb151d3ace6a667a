"""nvae_hub: NVAE, the deep hierarchical VAE of Vahdat & Kautz (NeurIPS 2020), ready to train, load, sample,
export and explore."""

from .config import NVAEConfig
from .hub import load_pretrained
from .model import NVAE, Latents, LossOutput

__all__ = ["NVAE", "Latents", "LossOutput", "NVAEConfig", "load_pretrained"]
__version__ = "0.1.0"
