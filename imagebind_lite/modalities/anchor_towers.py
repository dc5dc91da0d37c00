"""The anchor's own modalities: their towers come from the frozen CLIP (``anchor.py``)."""

from ..files import IMAGE_EXTS
from ..registry import IMAGE_TOWER, TEXT_TOWER, ModalitySpec, register_modality

register_modality(
    ModalitySpec(
        name="vision",
        temperature=0.07,
        sizes={},
        build_stem=None,
        anchor_tower=IMAGE_TOWER,
        description="RGB images: frozen CLIP tower",
        aliases=("image", "rgb"),
        extensions=IMAGE_EXTS,
        # The rendered scenes' RGB in [0, 1]; the probes normalise it as the anchor does.
        scene_input=lambda scenes: scenes["rgb"],
    )
)
register_modality(
    ModalitySpec(
        name="text",
        temperature=0.07,
        sizes={},
        build_stem=None,
        anchor_tower=TEXT_TOWER,
        description="captions / class prompts: frozen CLIP tower",
        extensions=(".txt",),  # the whole file is one text
    )
)
