"""imagebind_lite: bind new sensor modalities to a frozen CLIP anchor.

The pieces a researcher looks for first:
- the encoder: ``imagebind_lite.models.encoder.ModalityEncoder`` (stem -> ViT trunk -> head),
  built for a modality by ``imagebind_lite.models.build.build_encoder``
- the modality registry: ``imagebind_lite.registry`` (``ModalitySpec``, ``register_modality``);
  the built-in modalities, one file each: ``imagebind_lite/modalities/``
- the datasets: ``imagebind_lite.data`` (registry: ``data.registry``; shared parts and the
  evaluation mode: ``data.datasets``)
- the loss: ``imagebind_lite.loss.info_nce`` and ``siglip`` (its scale and bias: ``SigLIPHead``)
- the loop: ``imagebind_lite.training.loop`` (``fit``), run by ``imagebind_lite.train.train``

Layers (each imports only from the ones before it; ``tests/test_architecture.py`` checks):
1. core: ``registry``, ``threads``, ``config``, ``loss``, ``lora``, ``models/``, ``anchor``,
   ``checkpoint``
2. data: ``data/``, ``modalities/``, and ``builtins``, which registers the built-ins (this
   package imports it, so every entry point has them)
3. the training loop: ``training/`` (one loop; a task supplies batch -> loss, evaluation, saving)
4. ``evaluation/``, ``interop/``, ``cache``, ``bound`` (``BoundModel``: every modality in one
   object)
5. tasks: ``train``, ``anchor_finetune``
6. scripts: ``cli`` (and ``train/*.py``, ``eval/*.py``, ``bench/*.py`` outside the package),
   and this package namespace, which imports from every layer
"""

from . import builtins  # noqa: F401 - registers the built-in modalities and datasets
from ._version import __version__
from .bound import BoundModel
from .checkpoint import load_model, save_model
from .models.build import build_encoder
from .registry import ModalitySpec, list_modalities, register_modality

__all__ = [
    "BoundModel",
    "ModalitySpec",
    "__version__",
    "build_encoder",
    "list_modalities",
    "load_model",
    "register_modality",
    "save_model",
]
