"""The built-in modalities, one file each (``audio``, ``depth``, ``thermal``, ``imu``, and the
anchor's own ``vision`` and ``text`` in ``anchor_towers``), and the registry's public names.

Each file builds its ``ModalitySpec`` (stem, sizes, reader, augmentation and every other hook;
see ``imagebind_lite.registry``) and registers it; ``imagebind_lite.builtins`` imports them.
This package module imports none of them: it only re-exports the registry
(``imagebind_lite.registry``) and the encoder builder (``imagebind_lite.models.build``) under
the names researchers use, ``from imagebind_lite.modalities import ModalitySpec,
register_modality``.
"""

from ..models.build import TRUNK_FIELDS, build_encoder, resolve_size
from ..registry import (
    _REGISTRY,
    ImageBindBranch,
    ImageBindCheckpointError,
    ModalitySpec,
    get_modality,
    import_modality_file,
    list_modalities,
    register_modality,
)

__all__ = [
    "TRUNK_FIELDS",
    "ImageBindBranch",
    "ImageBindCheckpointError",
    "ModalitySpec",
    "_REGISTRY",
    "build_encoder",
    "get_modality",
    "import_modality_file",
    "list_modalities",
    "register_modality",
    "resolve_size",
]
