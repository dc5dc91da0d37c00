"""imagebind_lite: bind new sensor modalities to a frozen CLIP anchor.

The pieces a researcher looks for first:
- the encoder: ``imagebind_lite.models.encoder.ModalityEncoder`` (stem -> ViT trunk -> head)
- the modality registry: ``imagebind_lite.modalities`` (``register_modality``, ``build_encoder``)
- the loss: ``imagebind_lite.loss.info_nce``
- the loop: ``imagebind_lite.training.loop`` (``fit``), run by ``imagebind_lite.train.train``
"""

from .checkpoint import load_model, save_model
from .modalities import ModalitySpec, build_encoder, list_modalities, register_modality

__all__ = [
    "ModalitySpec",
    "build_encoder",
    "list_modalities",
    "load_model",
    "register_modality",
    "save_model",
]
__version__ = "0.1.0"
