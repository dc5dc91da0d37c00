"""The one module that registers the built-in modalities and datasets, by importing the files
that define them. ``imagebind_lite/__init__.py`` imports it, so every entry point (the package,
any of its modules, the scripts) sees the same registries.

Modality files (``imagebind_lite/modalities/``): the anchor's vision and text, audio, depth,
IMU, pen, thermal. Dataset modules (``imagebind_lite/data/``): AV-MNIST, pendigits, the
synthetic scenes, manifests, tar shards and the standard layouts (AudioSet, VGGSound, SUN RGB-D,
NYU-D, LLVIP).
"""

from .data import avmnist, layout_datasets, manifest, pendigits, scenes, shards
from .modalities import anchor_towers, audio, depth, imu, pen, thermal

MODALITY_MODULES = (anchor_towers, audio, depth, imu, pen, thermal)
DATASET_MODULES = (avmnist, scenes, manifest, shards, layout_datasets, pendigits)
