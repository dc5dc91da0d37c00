"""A run's evaluation report: ``metrics.json`` + ``report.md`` + PNG plots in one folder.

Contents: zero-shot top-1/top-5 on the run's evaluation split, the confusion matrix and
per-class accuracy, a similarity matrix of a sample batch (the modality against the class
prompts and against images), a 2-D PCA projection of the shared space coloured by modality and
by class, cross-modal retrieval (R@K, median rank) with example top-k lists, the geometry of the
space (modality gap, alignment, uniformity), the limitation-probe table, an optional few-shot
linear probe, and the training loss curve read from the run's TensorBoard logs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic_write_json
from ..registry import IMAGE_TOWER, TEXT_TOWER, anchor_tower_of, get_modality
from .linear_probe import linear_probe
from .metrics import alignment, modality_gap, uniformity
from .probes import as_dicts, format_probe_table, run_probes
from .protocols import (
    cross_modal_retrieval,
    evaluate_run,
    run_bundle,
    run_collections,
    run_train_collection,
)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data) -> Path:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    return atomic_write_json(path, _plain(data))


# ------------------------------------------------------------------------- training curves


def read_training_curves(run_dir: str | Path, tags: Sequence[str] = ("train/loss",)) -> dict:
    """Scalars of the run's TensorBoard event files -> {tag: (steps, values)} sorted by step.
    A resumed run writes several files; a later value for a step replaces an earlier one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = Path(run_dir) / "logs"
    found: dict[str, dict[int, float]] = {t: {} for t in tags}
    for events in sorted(logs.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        available = acc.Tags().get("scalars", [])
        for tag in tags:
            if tag in available:
                for event in acc.Scalars(tag):
                    found[tag][event.step] = event.value
    return {t: (sorted(v), [v[s] for s in sorted(v)]) for t, v in found.items() if v}


# ------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, safe in CI and over ssh
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(curves: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag, (steps, values) in curves.items():
        ax.plot(steps, values, label=tag, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss (InfoNCE)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(matrix, classnames: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    cm = torch.as_tensor(matrix, dtype=torch.float32)
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    n = len(classnames)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classnames, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j] > 0:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title("zero-shot confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(accuracy: Sequence[float], classnames: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    n = len(classnames)
    values = [0.0 if (a is None or a != a) else 100 * a for a in accuracy]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * n + 1.5), 3.5))
    ax.bar(range(n), values, color="tab:blue")
    ax.axhline(100 / n, color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("per-class zero-shot accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_similarity(
    sim: torch.Tensor, rows: Sequence[str], cols: Sequence[str], path: Path, title: str
) -> Path:
    plt = _pyplot()
    label_room = 0.07 * max((len(r) for r in rows), default=0)  # inches for the row labels
    fig, ax = plt.subplots(figsize=(2.0 + label_room + 0.45 * len(cols), 1.5 + 0.4 * len(rows)))
    im = ax.imshow(sim.numpy(), cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, 2] on the two leading principal components (torch.pca_lowrank)."""
    x = x.float()
    _, _, v = torch.pca_lowrank(x, q=min(2, *x.shape), center=True, niter=4)
    return (x - x.mean(0)) @ v[:, :2]


# (marker, size, edge colour) by anchor tower: class prompts large stars, images squares,
# a trained modality's items dots.
_PROJECTION_STYLE = {
    TEXT_TOWER: ("*", 60, "black"),
    IMAGE_TOWER: ("s", 8, "none"),
    None: ("o", 8, "none"),
}


def plot_projection(
    collections: dict,
    classnames: Sequence[str] | None,
    path: Path,
    per_modality: int = 400,
    seed: int = 0,
) -> Path:
    """PCA of the normalised embeddings of every modality together: left coloured by
    modality (the modality gap shows as separate clouds), right by class."""
    plt = _pyplot()
    g = torch.Generator().manual_seed(seed)
    parts, mods, labels = [], [], []
    for name, coll in collections.items():
        n = len(coll.embeddings)
        pick = torch.randperm(n, generator=g)[:per_modality]
        parts.append(F.normalize(coll.embeddings[pick].float(), dim=-1))
        mods += [name] * len(pick)
        labels += [coll.labels[i] for i in pick.tolist()] if coll.labels else [-1] * len(pick)
    xy = pca_2d(torch.cat(parts)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for i, name in enumerate(collections):
        sel = [j for j, m in enumerate(mods) if m == name]
        marker, size, edge = _PROJECTION_STYLE[anchor_tower_of(name)]
        axes[0].scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=size,
            marker=marker,
            label=name,
            alpha=0.7,
            color=f"C{i}",
        )
    axes[0].set_title("shared space, by modality")
    axes[0].legend(fontsize=8)
    cmap = plt.get_cmap("tab10" if len(classnames or []) <= 10 else "tab20")
    for name in collections:
        sel = [j for j, m in enumerate(mods) if m == name]
        colours = [cmap(labels[j] % cmap.N) if labels[j] >= 0 else (0.5, 0.5, 0.5, 1) for j in sel]
        marker, size, edge = _PROJECTION_STYLE[anchor_tower_of(name)]
        axes[1].scatter(
            xy[sel, 0],
            xy[sel, 1],
            c=colours,
            s=size,
            marker=marker,
            alpha=0.7,
            edgecolors=edge,
        )
    if classnames:
        for c, cname in enumerate(classnames[: cmap.N]):
            axes[1].scatter([], [], color=cmap(c), label=cname, s=12)
        axes[1].legend(fontsize=7, ncol=2, loc="best")
    axes[1].set_title("by class (o: items, s: images, *: class prompts)")
    for ax in axes:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------- report pieces


def sample_rows(labels: Sequence[int] | None, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` rows, one class after another (round robin) so the sample shows classes."""
    if not labels:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=g).tolist():
        by_class.setdefault(labels[i], []).append(i)
    rows, depth = [], 0
    while len(rows) < n and any(len(v) > depth for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(rows) < n:
                rows.append(by_class[c][depth])
        depth += 1
    return sorted(rows, key=lambda i: labels[i])


def retrieval_examples(
    query, gallery, k: int = 5, rows: Sequence[int] = (), classnames=None
) -> list[dict]:
    """Top-k gallery items for some queries, each marked correct (same id, else same class)."""
    out = []
    q = F.normalize(query.embeddings[list(rows)].float(), dim=-1)
    sims = q @ F.normalize(gallery.embeddings.float(), dim=-1).T
    scores, idx = sims.topk(min(k, sims.shape[1]), dim=1)
    paired = (
        query.ids is not None
        and gallery.ids is not None
        and bool(set(query.ids) & set(gallery.ids))
    )
    for n, row in enumerate(rows):
        top = []
        for s, j in zip(scores[n].tolist(), idx[n].tolist()):
            if paired:
                correct = gallery.ids[j] == query.ids[row]
            elif query.labels is not None and gallery.labels is not None:
                correct = gallery.labels[j] == query.labels[row]
            else:
                correct = None
            top.append(
                {
                    "item": gallery.names[j] if gallery.names else str(j),
                    "score": s,
                    "correct": correct,
                }
            )
        label = query.labels[row] if query.labels else None
        out.append(
            {
                "query": query.names[row] if query.names else str(row),
                "class": classnames[label] if classnames and label is not None else label,
                "top": top,
            }
        )
    return out


def space_geometry(collections: dict, modality: str) -> dict:
    """Modality gap (every pair), uniformity (every modality) and alignment of the run's
    modality with its positives: its class prompt (class-level data) and its paired image
    (when samples carry one)."""
    out = {"uniformity": {}, "modality_gap": {}, "alignment": {}}
    names = list(collections)
    for name in names:
        if len(collections[name].embeddings) > 1:
            out["uniformity"][name] = uniformity(collections[name].embeddings[:5000])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out["modality_gap"][f"{a}-{b}"] = modality_gap(
                collections[a].embeddings, collections[b].embeddings
            )
    mine = collections[modality]
    text = collections.get("text")
    if text is not None and mine.labels is not None and text.ids is None:
        out["alignment"][f"{modality}-text(class prompt)"] = alignment(
            mine.embeddings, text.embeddings[torch.tensor(mine.labels)]
        )
    vision = collections.get("vision")
    if vision is not None and vision.ids is not None and vision.ids == mine.ids:
        out["alignment"][f"{modality}-vision(paired)"] = alignment(
            mine.embeddings, vision.embeddings
        )
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class _Report:
    """What the sections of a report read (the run's collections) and add to (metrics, plots,
    markdown lines), in the order they appear."""

    out: Path
    colls: dict
    info: dict
    metrics: dict = field(default_factory=dict)
    plots: dict = field(default_factory=dict)
    md: list = field(default_factory=list)

    @property
    def modality(self) -> str:
        return self.info["modality"]

    @property
    def classnames(self):
        return self.info["classnames"]

    @property
    def mine(self):
        return self.colls[self.modality]


def build_report(
    space,
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    probes: bool = True,
    linear: bool = False,
    sample: int = 12,
    k: int = 5,
    batch_size: int = 64,
    progress: bool = False,
    templates=None,
    shots: Sequence[int | None] = (1, 5, 10, None),
    seeds: int = 2,
) -> dict:
    """Evaluate the run and write ``out_dir`` (default ``RUN/report``). Returns the metrics."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    built = run_bundle(run_dir, space.anchor)
    colls, info = run_collections(space, run_dir, templates, batch_size, progress, built=built)
    r = _Report(out, colls, info)
    _header(r, run_dir)
    if r.classnames and "text" in colls and r.mine.labels is not None:
        _zero_shot_section(r, space, run_dir)
    rows = sample_rows(r.mine.labels, min(sample, len(r.mine.embeddings)))
    _similarity_section(r, rows)
    _space_section(r)
    _retrieval_section(r, rows, k)
    if probes:
        _probe_section(r, space, run_dir)
    if linear and r.mine.labels is not None:
        train, _ = run_train_collection(space, run_dir, batch_size, progress, built=built)
        _linear_probe_section(r, train, shots, seeds)
    _training_section(r, run_dir)
    r.metrics["plots"] = {k2: p.name for k2, p in r.plots.items()}
    write_json(out / "metrics.json", r.metrics)
    (out / "report.md").write_text("\n".join(r.md))
    return r.metrics


def _header(r: _Report, run_dir: Path) -> None:
    info = r.info
    r.md += [f"# Evaluation report: `{run_dir.name}`", ""]
    r.metrics.update(
        run_dir=str(run_dir),
        modality=r.modality,
        dataset=info["dataset"],
        num_eval=info["num_eval"],
    )
    r.md += [
        f"Modality **{r.modality}**, dataset **{info['dataset']}** (evaluation split, "
        f"{info['num_eval']} items).",
        "",
    ]


def _zero_shot_section(r: _Report, space, run_dir: Path) -> None:

    classnames, info = r.classnames, r.info
    m = evaluate_run(space, run_dir, collections=(r.colls, info))["metrics"]
    r.metrics["zero_shot"] = {
        "top1": m["top1"],
        "top5": m["top5"],
        "per_class_accuracy": dict(zip(classnames, m["per_class_accuracy"])),
        "confusion_matrix": m["confusion_matrix"],
        "templates": info.get("templates"),
    }
    r.plots["confusion"] = plot_confusion(
        m["confusion_matrix"], classnames, r.out / "confusion_matrix.png"
    )
    r.plots["per_class"] = plot_per_class(
        m["per_class_accuracy"], classnames, r.out / "per_class_accuracy.png"
    )
    r.md += [
        "## Zero-shot classification",
        "",
        f"Top-1 **{100 * m['top1']:.1f}%**, top-5 **{100 * m['top5']:.1f}%** over "
        f"{len(classnames)} classes (chance {100 / len(classnames):.1f}%), prompts "
        f"ensembled over {len(info.get('templates') or [])} templates.",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![per-class accuracy](per_class_accuracy.png)",
        "",
    ]


def _similarity_section(r: _Report, rows: list[int]) -> None:
    """A sample batch against the class prompts and against images."""
    mine, classnames, colls, modality = r.mine, r.classnames, r.colls, r.modality
    row_names = [
        f"{mine.names[i]} ({classnames[mine.labels[i]]})"
        if classnames and mine.labels
        else mine.names[i]
        for i in rows
    ]
    x = F.normalize(mine.embeddings[rows].float(), dim=-1)
    if "text" in colls and colls["text"].ids is None:
        sim = x @ F.normalize(colls["text"].embeddings.float(), dim=-1).T
        r.plots["similarity_text"] = plot_similarity(
            sim,
            row_names,
            colls["text"].names,
            r.out / "similarity_text.png",
            f"{modality} sample vs class prompts",
        )
        r.md += ["## Similarity of a sample batch", "", "![vs prompts](similarity_text.png)", ""]
    if "vision" in colls:
        vision = colls["vision"]
        cols = _image_columns(mine, vision, rows)
        sim = x @ F.normalize(vision.embeddings[cols].float(), dim=-1).T
        r.plots["similarity_vision"] = plot_similarity(
            sim,
            row_names,
            [vision.names[j] for j in cols],
            r.out / "similarity_vision.png",
            f"{modality} sample vs images (diagonal: same class/pair)",
        )
        r.md += ["![vs images](similarity_vision.png)", ""]


def _image_columns(mine, vision, rows: list[int]) -> list[int]:
    """The image shown against each sample row: its pair, else an image of its class."""
    if vision.ids is not None and vision.ids == mine.ids:
        return rows  # the images paired with the sample
    if not (mine.labels and vision.labels):
        return [i % len(vision.embeddings) for i in rows]
    # A different image of the row's class for each row of that class.
    by_class: dict[int, list[int]] = {}
    for j, lbl in enumerate(vision.labels):
        by_class.setdefault(lbl, []).append(j)
    seen: dict[int, int] = {}
    cols = []
    for i in rows:
        lbl = mine.labels[i]
        options = by_class.get(lbl) or [0]
        cols.append(options[seen.get(lbl, 0) % len(options)])
        seen[lbl] = seen.get(lbl, 0) + 1
    return cols


def _space_section(r: _Report) -> None:
    r.plots["projection"] = plot_projection(r.colls, r.classnames, r.out / "projection.png")
    r.md += ["## The shared space", "", "![PCA projection](projection.png)", ""]
    geometry = space_geometry(r.colls, r.modality)
    r.metrics["geometry"] = geometry
    r.md += [
        "Modality gap (distance between centroids of normalised embeddings), alignment "
        "(E||x-y||^2 over positive pairs; 0 best, 4 worst) and uniformity "
        "(log E exp(-2||x-y||^2); lower is more uniform):",
        "",
        _md_table(
            ["quantity", "between", "value"],
            [
                [q, k2, f"{v:.3f}"]
                for q in ("modality_gap", "alignment", "uniformity")
                for k2, v in geometry[q].items()
            ],
        ),
        "",
    ]


def _retrieval_section(r: _Report, rows: list[int], k: int) -> None:

    retrieval = cross_modal_retrieval(r.colls)
    r.metrics["retrieval"] = retrieval
    r.md += [
        "## Cross-modal retrieval",
        "",
        _md_table(
            ["direction", "positives", "queries", "gallery", "R@1", "R@5", "R@10", "median rank"],
            [
                [
                    d,
                    x["positives"],
                    x["queries"],
                    x["gallery"],
                    *[f"{100 * x[f'R@{j}']:.1f}" for j in (1, 5, 10)],
                    f"{x['median_rank']:.0f}",
                ]
                for d, x in retrieval.items()
            ],
        ),
        "",
    ]
    examples = {}
    for target in ("vision", "text"):
        if target in r.colls:
            ex = retrieval_examples(
                r.mine, r.colls[target], k, rows[: min(4, len(rows))], r.classnames
            )
            examples[f"{r.modality}->{target}"] = ex
            r.md += [f"Top-{k} {target} for sample {r.modality} queries (correct marked ✓):", ""]
            r.md += _examples_table(ex, k).split("\n") + [""]
    r.metrics["retrieval_examples"] = examples


def _examples_table(examples: list[dict], k: int) -> str:
    return _md_table(
        ["query", *[f"#{j + 1}" for j in range(k)]],
        [
            [
                f"{e['query']} ({e['class']})",
                *[f"{t['item']} {t['score']:.2f}{' ✓' if t['correct'] else ''}" for t in e["top"]],
            ]
            for e in examples
        ],
    )


def _probe_section(r: _Report, space, run_dir: Path) -> None:

    normalisation = run_normalisation(run_dir, space, r.modality)
    results = run_probes(space, r.colls, r.info, normalisation)
    r.metrics["probes"] = as_dicts(results)
    r.md += [
        "## Limitation probes",
        "",
        "Item probes: share of items whose true text beats the false one (chance 50%). "
        "Text probes: share of pairs whose cosine is below 0.9.",
        "",
        format_probe_table(results),
        "",
    ]


def _linear_probe_section(r: _Report, train, shots, seeds: int) -> None:

    mine = r.mine
    lp = linear_probe(
        train.embeddings,
        train.labels,
        mine.embeddings,
        mine.labels,
        len(r.classnames),
        shots=shots,
        seeds=seeds,
    )
    r.metrics["linear_probe"] = lp
    r.md += [
        "## Few-shot linear probe",
        "",
        "Logistic regression on frozen embeddings of the training split; weight decay "
        "chosen on a held-out part of it.",
        "",
        _md_table(
            ["shots per class", "top-1", "std"],
            [[s, f"{100 * v['top1']:.1f}", f"{100 * v['std']:.1f}"] for s, v in lp.items()],
        ),
        "",
    ]


def _training_section(r: _Report, run_dir: Path) -> None:
    curves = read_training_curves(run_dir)
    if not curves:
        r.md += [
            "## Training",
            "",
            "No TensorBoard `train/loss` in the run's logs (trained with tracker=null).",
            "",
        ]
        return
    r.plots["training_curves"] = plot_training_curves(curves, r.out / "training_curves.png")
    steps, values = curves["train/loss"]
    r.metrics["training"] = {"steps": steps[-1], "first_loss": values[0], "last_loss": values[-1]}
    r.md += [
        "## Training",
        "",
        f"Loss {values[0]:.3f} -> {values[-1]:.3f} over {steps[-1]} steps.",
        "",
        "![training curves](training_curves.png)",
        "",
    ]


def run_normalisation(run_dir: Path, space, modality: str) -> dict:
    """The statistics the run's data were standardised with, for a modality the rendered probe
    scenes are given to (``ModalitySpec.scene_input``: depth, thermal)."""
    spec = get_modality(modality)
    if spec.scene_input is None or spec.is_anchor:
        return {}
    saved = run_dir / "metrics.json"
    if saved.is_file():
        stats = json.loads(saved.read_text()).get("data_normalisation")
        if stats and "mean" in stats:
            return {modality: {"mean": stats["mean"], "std": stats["std"]}}
    pre = space.preprocess(modality)
    if pre.get("mean") is not None:
        return {modality: {"mean": pre["mean"], "std": pre["std"]}}
    return {}
