"""Prompt templates for zero-shot classification.

ImageBind scores every modality against CLIP's 80 ImageNet templates (Radford et al. 2021,
"Prompt engineering and ensembling"), averaged per class after normalising (prompt ensembling).
They ship here as data so an evaluation never depends on a notebook or a download.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.avmnist import DIGIT_TEMPLATES
from ..data.scenes import SHAPE_TEMPLATES

IMAGENET_TEMPLATES = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

# The subset CLIP's authors found best on ImageNet (their notebook's selection of 7).
SIMPLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

SOUND_TEMPLATES = [
    "the sound of a {}.",
    "a recording of a {}.",
    "this is a sound of {}.",
    "an audio clip of {}.",
    "{} can be heard.",
]


TEMPLATE_SETS = {
    "imagenet": lambda: list(IMAGENET_TEMPLATES),
    "clip": lambda: list(IMAGENET_TEMPLATES),
    "imagenet7": lambda: list(SIMPLE_TEMPLATES),
    "plain": lambda: ["{}"],
    "photo": lambda: ["a photo of a {}."],
    "sound": lambda: list(SOUND_TEMPLATES),
    "digits": lambda: list(DIGIT_TEMPLATES),
    "shapes": lambda: list(SHAPE_TEMPLATES),
}


def get_templates(spec: str | Sequence[str]) -> list[str]:
    """A template set by name (``imagenet``, ``imagenet7``, ``plain``, ``photo``, ``sound``,
    ``digits``, ``shapes``), templates separated by ``|``, or a list of templates.
    Every template must hold exactly one ``{}``."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]()
        if "{}" not in spec:
            raise ValueError(
                f"unknown template set {spec!r}; known: {', '.join(TEMPLATE_SETS)} "
                "(or give templates containing '{}')"
            )
        templates = [t.strip() for t in spec.split("|")] if "|" in spec else [spec]
    else:
        templates = list(spec)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"every template needs exactly one '{{}}': {bad or templates}")
    return templates


def readable_classname(name: str) -> str:
    """Dataset label -> prompt text: ``vacuum_cleaner`` -> ``vacuum cleaner``."""
    return name.replace("_", " ").strip()
