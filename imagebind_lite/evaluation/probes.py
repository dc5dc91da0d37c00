"""Limitation probes: does the shared space tell apart texts that differ only in negation,
count, spatial relation, or an abstract or rare concept?

Two kinds of probe:

* item probes: an item (an image, or a clip / depth map / thermal image through a run's
  encoder) and two texts, one true of it and one false; the probe is passed when the item's
  cosine with the true text is higher. Chance is 0.5. On the embedded default they use its own
  domain: held-out digit images and test clips ("the digit seven." vs "not the digit seven."),
  and scenes rendered here with a known count and position of shapes ("a photo of two
  circles." vs "a photo of one circle.", "... on the left." vs "... on the right."). A control
  probe (the shape's name against another shape's) shows the space works where no composition
  is needed, so a failure elsewhere is the composition's, not the space's.
* text probes: generated pairs of texts that mean different things ("a photo of a dog." vs
  "a photo with no dog."); the pair counts as told apart when the cosine of the two texts is
  below ``threshold``. There is no chance level; the mean cosine is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..data.avmnist import DIGIT_NAMES
from ..data.scenes import SHAPES, _shape_masks
from ..registry import TEXT_TOWER, anchor_tower_of, get_modality
from .metrics import alignment_accuracy
from .space import anchor_modalities

OBJECTS = ["dog", "cat", "car", "bird", "chair", "apple", "tree", "house", "boat", "horse"]
PLURALS = {"cross": "crosses", "box": "boxes", "bus": "buses"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
ABSTRACT_PAIRS = [
    ("freedom", "oppression"),
    ("justice", "injustice"),
    ("hope", "despair"),
    ("love", "hatred"),
    ("peace", "war"),
    ("truth", "deception"),
    ("joy", "grief"),
    ("wealth", "poverty"),
    ("courage", "fear"),
    ("order", "chaos"),
]
# A rare concept against the common one it is easily taken for.
RARE_PAIRS = [
    ("an okapi", "a zebra"),
    ("a pangolin", "an armadillo"),
    ("a quokka", "a wallaby"),
    ("an axolotl", "a salamander"),
    ("a theremin", "a violin"),
    ("a sousaphone", "a tuba"),
    ("a dugong", "a manatee"),
    ("a narwhal", "a whale"),
    ("a shoebill", "a stork"),
    ("a kinkajou", "a monkey"),
]


def plural(word: str) -> str:
    return PLURALS.get(word, word + "s")


@dataclass
class ProbeResult:
    probe: str
    family: str  # negation, counting, spatial, abstract, rare, control
    modality: str  # the items' modality, or "text" for text-only probes
    pairs: int
    accuracy: float  # share told apart
    chance: float | None  # None for text-only probes
    mean_cosine: float | None = None  # text-only: mean cosine of the pair
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------------- text probe sets


def text_probe_pairs() -> dict[str, list[tuple[str, str]]]:
    """Generated probe sets: family -> (text, contrasting text) pairs."""
    pairs: dict[str, list[tuple[str, str]]] = {
        "negation": [(f"a photo of a {o}.", f"a photo with no {o}.") for o in OBJECTS],
        "counting": [
            (
                f"a photo of {NUMBER_WORDS[n]} {plural(o)}.",
                f"a photo of {NUMBER_WORDS[n + 1]} {plural(o)}.",
            )
            for o in OBJECTS
            for n in (2, 3)
        ],
        "spatial": [
            (f"a photo of a {a} to the left of a {b}.", f"a photo of a {b} to the left of a {a}.")
            for a, b in zip(OBJECTS, OBJECTS[1:] + OBJECTS[:1])
        ],
        "abstract": [(f"a picture about {a}.", f"a picture about {b}.") for a, b in ABSTRACT_PAIRS],
        "rare": [(f"a photo of {a}.", f"a photo of {b}.") for a, b in RARE_PAIRS],
    }
    return pairs


@torch.no_grad()
def text_probes(
    encode_text, threshold: float = 0.9, families: Sequence[str] | None = None
) -> list[ProbeResult]:
    """Text-only probes: how often the two texts of a pair are further apart than
    ``threshold`` in cosine."""
    out = []
    for family, pairs in text_probe_pairs().items():
        if families and family not in families:
            continue
        a = F.normalize(encode_text([p[0] for p in pairs]).float(), dim=-1)
        b = F.normalize(encode_text([p[1] for p in pairs]).float(), dim=-1)
        cos = (a * b).sum(-1).cpu()
        worst = int(cos.argmax())
        out.append(
            ProbeResult(
                f"text {family}",
                family,
                "text",
                len(pairs),
                float((cos < threshold).float().mean()),
                None,
                float(cos.mean()),
                {
                    "threshold": threshold,
                    "closest_pair": list(pairs[worst]),
                    "closest_cosine": float(cos[worst]),
                },
            )
        )
    return out


# ----------------------------------------------------------------------------- item probes


@torch.no_grad()
def item_probe(
    name: str,
    family: str,
    modality: str,
    items: torch.Tensor,
    true_texts: Sequence[str],
    false_texts: Sequence[str],
    encode_text,
) -> ProbeResult:
    """Items [N, D] each with its true and false text -> share where the true one wins."""
    if not (len(items) == len(true_texts) == len(false_texts)):
        raise ValueError("one true and one false text per item")
    unique = list(dict.fromkeys([*true_texts, *false_texts]))
    emb = F.normalize(encode_text(unique).float(), dim=-1).cpu()
    index = {t: i for i, t in enumerate(unique)}
    pos = emb[[index[t] for t in true_texts]]
    neg = emb[[index[t] for t in false_texts]].unsqueeze(1)
    acc = alignment_accuracy(items.cpu(), pos, neg)
    return ProbeResult(
        name,
        family,
        modality,
        len(items),
        acc,
        0.5,
        detail={"example": [true_texts[0], false_texts[0]]},
    )


def digit_probes(
    items: torch.Tensor, labels: Sequence[int], modality: str, encode_text, seed: int = 0
) -> list[ProbeResult]:
    """Negation on digits: "the digit X." vs "not the digit X." (the item shows X), and
    "not the digit Y." (true) vs "not the digit X." (false), which a bag of words cannot pass;
    and a control, "the digit X." vs "the digit Y."."""
    g = torch.Generator().manual_seed(seed)
    others = [(int(lbl) + 1 + int(torch.randint(9, (1,), generator=g))) % 10 for lbl in labels]
    name = [DIGIT_NAMES[int(lbl)] for lbl in labels]
    other = [DIGIT_NAMES[o] for o in others]
    return [
        item_probe(
            "digit vs other digit (control)",
            "control",
            modality,
            items,
            [f"the digit {n}." for n in name],
            [f"the digit {o}." for o in other],
            encode_text,
        ),
        item_probe(
            "X vs not X",
            "negation",
            modality,
            items,
            [f"the digit {n}." for n in name],
            [f"not the digit {n}." for n in name],
            encode_text,
        ),
        item_probe(
            "not Y vs not X",
            "negation",
            modality,
            items,
            [f"not the digit {o}." for o in other],
            [f"not the digit {n}." for n in name],
            encode_text,
        ),
    ]


def render_probe_scenes(
    objects: Sequence[Sequence[tuple[int, float, float, float]]], size: int = 32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Scenes with chosen shapes at chosen places, in the style of ``data.scenes``:
    ``objects[i]`` lists (shape, cx, cy, radius) of scene i, coordinates in [0, 1].
    Returns ``rgb`` [N,3,S,S] in [0,1], ``depth`` metres [N,1,S,S], ``thermal`` [N,1,S,S]."""
    g = torch.Generator().manual_seed(seed)
    n = len(objects)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=g)

    mask = torch.zeros(n, 1, size, size)
    for i, scene in enumerate(objects):
        for shape, cx, cy, radius in scene:
            m = _shape_masks(
                torch.tensor([shape]),
                torch.tensor([cx]),
                torch.tensor([cy]),
                torch.tensor([radius]),
                size,
            )
            mask[i, 0] = torch.maximum(mask[i, 0], m[0])
    rows = ((torch.arange(size, dtype=torch.float32) + 0.5) / size).view(1, 1, size, 1)
    horizon = uniform(0.3, 0.6, n).view(-1, 1, 1, 1)
    floor = (rows > horizon).float()
    wall, floor_rgb = uniform(0.1, 0.9, n, 3, 1, 1), uniform(0.1, 0.9, n, 3, 1, 1)
    obj = 1.0 - (wall + floor_rgb) / 2 + uniform(-0.15, 0.15, n, 3, 1, 1)
    background = wall * (1 - floor) + floor_rgb * floor * (0.7 + 0.3 * rows)
    rgb = (background * (1 - mask) + obj * mask) * uniform(0.7, 1.1, n, 1, 1, 1)
    wall_depth = uniform(4.0, 7.0, n).view(-1, 1, 1, 1)
    floor_depth = wall_depth * (horizon / rows.clamp(min=1e-3)).clamp(max=1.0) + 0.5
    background_depth = torch.where(floor.bool(), floor_depth, wall_depth.expand_as(floor_depth))
    depth = background_depth * (1 - mask) + uniform(1.0, 3.0, n).view(-1, 1, 1, 1) * mask
    ambient = uniform(0.1, 0.35, n).view(-1, 1, 1, 1) + 0.1 * floor
    thermal = ambient * (1 - mask) + uniform(0.6, 0.9, n).view(-1, 1, 1, 1) * mask
    return {"rgb": rgb.clamp(0, 1), "depth": depth.clamp(0.3, 10.0), "thermal": thermal.clamp(0, 1)}


def _count_scenes(n: int, g: torch.Generator):
    """Half the scenes hold one shape, half two of the same shape, side by side."""
    specs, texts = [], []
    for i in range(n):
        shape = int(torch.randint(len(SHAPES), (1,), generator=g))
        count = 1 + i % 2
        r = 0.12 + 0.04 * float(torch.rand(1, generator=g))
        cy = 0.4 + 0.2 * float(torch.rand(1, generator=g))
        xs = [0.5] if count == 1 else [0.28, 0.72]
        specs.append([(shape, x, cy, r) for x in xs])
        word = SHAPES[shape]
        one, two = f"a photo of one {word}.", f"a photo of two {plural(word)}."
        texts.append((one, two) if count == 1 else (two, one))
    return specs, texts


def _side_scenes(n: int, g: torch.Generator):
    specs, texts, controls = [], [], []
    for i in range(n):
        shape = int(torch.randint(len(SHAPES), (1,), generator=g))
        left = i % 2 == 0
        r = 0.14 + 0.05 * float(torch.rand(1, generator=g))
        cy = 0.4 + 0.2 * float(torch.rand(1, generator=g))
        specs.append([(shape, 0.27 if left else 0.73, cy, r)])
        word = SHAPES[shape]
        a, b = f"a photo of a {word} on the left.", f"a photo of a {word} on the right."
        texts.append((a, b) if left else (b, a))
        other = SHAPES[
            (shape + 1 + int(torch.randint(len(SHAPES) - 1, (1,), generator=g))) % len(SHAPES)
        ]
        controls.append((f"a photo of a {word}.", f"a photo of a {other}."))
    return specs, texts, controls


def _embed_scenes(scenes: dict, modality: str, encode, normalisation: dict | None):
    spec = get_modality(modality)
    x = spec.scene_input(scenes)  # what the modality sees of a scene
    if not spec.is_anchor:
        # The encoder saw its training data standardised; the rendered scenes must be too.
        stats = (normalisation or {}).get(modality) or {"mean": 0.0, "std": 1.0}
        x = (x - stats["mean"]) / stats["std"]
    return torch.cat(
        [F.normalize(encode(x[i : i + 128]).float(), dim=-1).cpu() for i in range(0, len(x), 128)]
    )


def scene_probes(
    encoders: dict,
    encode_text,
    num: int = 200,
    size: int = 32,
    seed: int = 0,
    normalisation: dict | None = None,
) -> list[ProbeResult]:
    """Counting, spatial and control probes on rendered scenes, for every modality in
    ``encoders``: each takes its ``ModalitySpec.scene_input`` of the scenes (vision: RGB in
    [0, 1], which its encoder normalises; depth/thermal: disparity / intensity, standardised
    here by ``normalisation[modality]`` = {mean, std} of the run's data)."""
    g = torch.Generator().manual_seed(seed)
    count_specs, count_texts = _count_scenes(num, g)
    side_specs, side_texts, control_texts = _side_scenes(num, g)
    count_scenes = render_probe_scenes(count_specs, size, seed + 1)
    side_scenes = render_probe_scenes(side_specs, size, seed + 2)
    out = []
    for modality, encode in encoders.items():
        counted = _embed_scenes(count_scenes, modality, encode, normalisation)
        sided = _embed_scenes(side_scenes, modality, encode, normalisation)
        out += [
            item_probe(
                "shape vs other shape (control)",
                "control",
                modality,
                sided,
                [c[0] for c in control_texts],
                [c[1] for c in control_texts],
                encode_text,
            ),
            item_probe(
                "one vs two shapes",
                "counting",
                modality,
                counted,
                [t[0] for t in count_texts],
                [t[1] for t in count_texts],
                encode_text,
            ),
            item_probe(
                "left vs right",
                "spatial",
                modality,
                sided,
                [t[0] for t in side_texts],
                [t[1] for t in side_texts],
                encode_text,
            ),
        ]
    return out


# ----------------------------------------------------------------------------- reporting


def format_probe_table(results: Sequence[ProbeResult]) -> str:
    """A Markdown table: probe, family, modality, pairs, accuracy, chance (mean cosine)."""
    lines = [
        "| probe | family | modality | pairs | accuracy | chance | mean cos |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        chance = "-" if r.chance is None else f"{100 * r.chance:.0f}%"
        cos = "-" if r.mean_cosine is None else f"{r.mean_cosine:.3f}"
        lines.append(
            f"| {r.probe} | {r.family} | {r.modality} | {r.pairs} | "
            f"{100 * r.accuracy:.1f}% | {chance} | {cos} |"
        )
    return "\n".join(lines)


def as_dicts(results: Sequence[ProbeResult]) -> list[dict]:
    return [asdict(r) for r in results]


def run_probes(
    space,
    collections: dict | None = None,
    run_info: dict | None = None,
    normalisation: dict | None = None,
    num_scenes: int = 200,
    threshold: float = 0.9,
    seed: int = 0,
) -> list[ProbeResult]:
    """Every probe that the space and the run's data allow: text probes always; digit probes
    on the digit-labelled collections of an AV-MNIST run (images and clips); scene probes for
    the anchor's images and for every encoder of the space whose modality sees the synthetic
    scenes (``ModalitySpec.scene_input``: depth, thermal)."""
    encode_text = space.anchor.encode_text
    results = []
    if run_info is not None and run_info.get("classnames") == DIGIT_NAMES and collections:
        for modality, coll in collections.items():
            if anchor_tower_of(modality) != TEXT_TOWER and coll.labels is not None:
                results += digit_probes(coll.embeddings, coll.labels, modality, encode_text, seed)
    anchor = space.anchor

    def vision(x):
        return anchor.encode_image(anchor.normalize_pixels(x))

    scene_encoders, size = {}, anchor.image_size[0]
    for modality in [*anchor_modalities(), *sorted(space.encoders)]:
        spec = get_modality(modality)
        if spec.scene_input is None:
            continue
        if spec.is_anchor:
            scene_encoders[modality] = vision
        else:
            scene_encoders[modality] = space.encoder_fn(modality)
            size = int(space.preprocess(modality).get("image_size", size))
    results += scene_probes(scene_encoders, encode_text, num_scenes, size, seed, normalisation)
    results += text_probes(encode_text, threshold)
    return results
