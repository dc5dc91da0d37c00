"""The anchor's own modalities: their towers come from the frozen CLIP (``anchor.py``)."""

from ..registry import ModalitySpec, register_modality

for _name, _what in (("vision", "RGB images"), ("text", "captions / class prompts")):
    register_modality(
        ModalitySpec(
            name=_name,
            temperature=0.07,
            sizes={},
            build_stem=None,
            is_anchor=True,
            description=f"{_what}: frozen CLIP tower",
        )
    )
