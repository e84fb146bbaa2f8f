"""Refiner-ViT for PyTorch Lightning. Importing this package registers the presets in timm."""

from refiner_pl import models  # noqa: F401  (registers refiner_vit_* in timm)

__version__ = "0.1.0"
