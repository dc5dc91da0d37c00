"""SYNTHETIC scenes for the offline depth and thermal defaults (clearly not real data).

Each scene is one shape (the class) standing in front of a floor-and-wall background, rendered
three ways from the same geometry: RGB (random colours and lighting), metric depth (the shape is
nearer than the background), and thermal (the shape is warm, the background cool with noise).
So an encoder that aligns depth or thermal to the RGB anchor can then name the shape from text.
Real data pipelines (SUN RGB-D, NYU-D, LLVIP) live in the other data modules.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset

from ..registry import get_modality, list_modalities
from .datasets import DatasetBundle, EpochRandom, register_dataset

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
SHAPE_TEMPLATES = [
    "a photo of a {}.",
    "a {} in a room.",
    "a picture of a {}.",
    "a {} shape.",
    "there is a {} in the scene.",
]


def _shape_masks(label: torch.Tensor, cx, cy, radius, size: int) -> torch.Tensor:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = (x - cx[:, None, None]) / radius[:, None, None]
    dy = (y - cy[:, None, None]) / radius[:, None, None]
    dist = torch.sqrt(dx**2 + dy**2)
    masks = torch.stack(
        [
            dist <= 1.0,  # circle
            (dx.abs() <= 0.85) & (dy.abs() <= 0.85),  # square
            (dy <= 0.8) & (dy >= -1.0 + 2 * dx.abs() * 1.0) & (dx.abs() <= 1.0),  # triangle
            ((dx.abs() <= 0.3) | (dy.abs() <= 0.3)) & (dx.abs() <= 1) & (dy.abs() <= 1),  # cross
            (dist <= 1.0) & (dist >= 0.55),  # ring
            (dx.abs() + dy.abs()) <= 1.0,  # diamond
        ],
        dim=1,
    )
    return masks[torch.arange(len(label)), label].float()


def render_scenes(num: int, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic scenes: ``rgb`` [N,3,S,S] in [0,1], ``depth`` metres [N,1,S,S],
    ``thermal`` [N,1,S,S] in [0,1], ``label`` [N]."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=g)

    label = torch.randint(len(SHAPES), (num,), generator=g)
    cx, cy = uniform(0.35, 0.65, num), uniform(0.35, 0.65, num)
    radius = uniform(0.2, 0.32, num)
    mask = _shape_masks(label, cx, cy, radius, size).unsqueeze(1)  # N,1,S,S

    rows = ((torch.arange(size, dtype=torch.float32) + 0.5) / size).view(1, 1, size, 1)
    horizon = uniform(0.3, 0.6, num).view(-1, 1, 1, 1)
    floor = (rows > horizon).float()

    # RGB: wall and floor colours, a shape colour far from both, mild shading and noise.
    wall = uniform(0.1, 0.9, num, 3, 1, 1)
    floor_rgb = uniform(0.1, 0.9, num, 3, 1, 1)
    obj = 1.0 - (wall + floor_rgb) / 2 + uniform(-0.15, 0.15, num, 3, 1, 1)
    background = wall * (1 - floor) + floor_rgb * floor * (0.7 + 0.3 * rows)
    rgb = background * (1 - mask) + obj * mask
    rgb = rgb * uniform(0.7, 1.1, num, 1, 1, 1) + 0.03 * torch.randn(rgb.shape, generator=g)

    # Depth: the wall at 4-7 m, the floor coming nearer towards the bottom, the shape at 1-3 m.
    wall_depth = uniform(4.0, 7.0, num).view(-1, 1, 1, 1)
    floor_depth = wall_depth * (horizon / rows.clamp(min=1e-3)).clamp(max=1.0) + 0.5
    background_depth = torch.where(floor.bool(), floor_depth, wall_depth.expand_as(floor_depth))
    obj_depth = uniform(1.0, 3.0, num).view(-1, 1, 1, 1)
    depth = background_depth * (1 - mask) + obj_depth * mask
    depth = depth * (1 + 0.01 * torch.randn(depth.shape, generator=g))

    # Thermal: a warm shape with a hot core, a cool background with sensor noise.
    core = torch.exp(-((rows - cy.view(-1, 1, 1, 1)) ** 2) / (2 * radius.view(-1, 1, 1, 1) ** 2))
    ambient = uniform(0.1, 0.35, num).view(-1, 1, 1, 1) + 0.1 * floor
    warm = uniform(0.6, 0.9, num).view(-1, 1, 1, 1) + 0.1 * core
    thermal = ambient * (1 - mask) + warm * mask + 0.04 * torch.randn(mask.shape, generator=g)

    return {
        "rgb": rgb.clamp(0, 1),
        "depth": depth.clamp(0.3, 10.0),
        "thermal": thermal.clamp(0, 1),
        "label": label,
    }


def depth_to_disparity(depth_m: torch.Tensor, max_depth: float = 8.0) -> torch.Tensor:
    """Metric depth -> disparity in 1/m (ImageBind's depth encoder sees disparity, not depth)."""
    return 1.0 / depth_m.clamp(0.3, max_depth)


class SceneSet(EpochRandom, Dataset):
    """Scenes with an optional horizontal flip applied to both sides of the pair.

    Anchor-cache mode (``imagebind_lite.cache``): the RGB view of a scene is either as rendered
    (view id = sample id) or flipped (``<id>/flip``), so two views per scene cover every pair
    training can draw. In that mode a sample names its view under ``"view_id"`` instead of
    carrying ``"vision"``; with one cached view per scene nothing is flipped.
    """

    anchor_views: int | None = None  # None: emit "vision"; an int: cache mode

    def __init__(self, vision, modality_tensor, labels, modality, ids, flip: bool, seed: int = 0):
        self.seed = seed
        self.vision, self.data, self.labels = vision, modality_tensor, labels
        self.modality, self.ids, self.flip = modality, ids, flip
        self.max_anchor_views = 2 if flip else 1
        self._row = {sample_id: row for row, sample_id in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.labels)

    def eval_mode(self) -> SceneSet:
        """The scenes as rendered: no random flip."""
        view = copy.copy(self)
        view.flip, view.max_anchor_views = False, 1
        return view

    def use_anchor_views(self, views: int | None) -> None:
        self.anchor_views = views

    def anchor_view_ids(self, views: int = 1) -> list[str]:
        flips = [f"{i}/flip" for i in self.ids] if min(views, self.max_anchor_views) > 1 else []
        return list(self.ids) + flips

    def anchor_input(self, view_id: str) -> torch.Tensor:
        sample_id, _, flipped = view_id.partition("/")
        vision = self.vision[self._row[sample_id]]
        return vision.flip(-1) if flipped else vision

    def __getitem__(self, index: int) -> dict:
        if self.anchor_views is not None:
            return self._cached_view_sample(index)
        vision, data = self.vision[index], self.data[index]
        if self.flip and torch.rand((), generator=self.generator(index)) < 0.5:
            # The same flip on both sides keeps the pair spatially aligned.
            vision, data = vision.flip(-1), data.flip(-1)
        return {
            "vision": vision,
            self.modality: data,
            "label": int(self.labels[index]),
            "id": self.ids[index],
        }

    def _cached_view_sample(self, index: int) -> dict:
        data, view = self.data[index], self.ids[index]
        # The same draw as above, so cached and uncached training see the same pairs.
        flipped = self.flip and torch.rand((), generator=self.generator(index)) < 0.5
        if flipped and self.anchor_views > 1:
            data, view = data.flip(-1), f"{view}/flip"
        return {
            self.modality: data,
            "label": int(self.labels[index]),
            "id": self.ids[index],
            "view_id": view,
        }


def scene_modality_raw(scenes: dict, spec) -> torch.Tensor:
    """The raw input of ``spec``'s modality in rendered scenes (``ModalitySpec.scene_input``)."""
    if spec.scene_input is None:
        rendered = [
            n
            for n in list_modalities(trainable_only=True)
            if get_modality(n).scene_input is not None
        ]
        raise ValueError(f"synthetic scenes render {' and '.join(rendered)}, not {spec.name!r}")
    return spec.scene_input(scenes)


@register_dataset("synthetic_scenes")
def build_scenes(cfg, anchor, spec) -> DatasetBundle:
    opts = {"train_size": 3000, "test_size": 600, "image_size": 32, **cfg.data.options}
    size = int(cfg.data.preprocess.get("image_size", opts["image_size"]))
    splits = {}
    for split, num, seed in (("train", opts["train_size"], 1), ("test", opts["test_size"], 2)):
        splits[split] = render_scenes(int(num), size=size, seed=seed)
    # Normalisation statistics come from the training split, never guessed.
    train_raw = scene_modality_raw(splits["train"], spec)
    mean, std = float(train_raw.mean()), float(train_raw.std())
    bundles = []
    for split, scenes in splits.items():
        vision = anchor.normalize_pixels(scenes["rgb"])
        data = (scene_modality_raw(scenes, spec) - mean) / std
        ids = [f"scene-{split}-{i}" for i in range(len(data))]
        bundles.append(
            SceneSet(vision, data, scenes["label"], spec.name, ids, split == "train", cfg.seed)
        )
    return DatasetBundle(
        train=bundles[0],
        eval=bundles[1],
        classnames=SHAPES,
        templates=SHAPE_TEMPLATES,
        info={
            "synthetic": True,
            "normalisation": {"mean": mean, "std": std},
            "train_scenes": len(bundles[0]),
            "test_scenes": len(bundles[1]),
        },
    )
