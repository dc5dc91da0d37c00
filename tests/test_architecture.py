"""The package's structure, read from its source with ``ast``: no module-level import cycle,
dependencies running one way through the layers, registries that are leaves, function-level
imports only for optional heavy dependencies, no branch on a modality's name outside
``imagebind_lite/modalities/``, an evaluation mode on every dataset class, and no function
over 80 lines in the package, train/, eval/ or bench/."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import torch
from conftest import REPO

import imagebind_lite
from imagebind_lite.registry import list_modalities

PACKAGE = Path(imagebind_lite.__file__).resolve().parent
ROOT = PACKAGE.name

# Lowest first. A module may import, at module level, only modules of its own layer or of a
# lower one. A prefix ending in "." takes a subpackage (and its __init__).
LAYERS = [
    (
        "core",
        [
            "registry",
            "files",
            "threads",
            "_version",
            "config",
            "loss",
            "lora",
            "models.",
            "anchor",
            "checkpoint",
        ],
    ),
    # Readers and datasets, and the modality files, which build their specs from the readers.
    ("data", ["data.", "modalities.", "builtins"]),
    # The one training loop; the tasks on it (train, anchor_finetune) sit above evaluation.
    ("loop", ["training."]),
    ("evaluation / interop / cache", ["evaluation.", "interop.", "cache", "bound"]),
    ("tasks", ["train", "anchor_finetune", "bind", "ceiling"]),
    # The package's namespace (importing it registers the built-ins) and the command line.
    ("scripts", ["cli", ""]),
]
LEAVES = ["registry", "data.registry", "files", "threads"]  # import nothing of the package


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if MODULES[module].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [
            f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names
        ]
    out = []
    for name in names:
        while name and name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != module:
            out.append(name)
    return out


def _module_level_imports(tree: ast.Module):
    """Import statements that run on import: top level, and inside top-level if/try blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                stack += handler.body


def _graph() -> dict[str, set[str]]:
    return {
        name: {t for node in _module_level_imports(tree) for t in _targets(name, node)}
        for name, tree in TREES.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    rel = module[len(ROOT) + 1 :] if module != ROOT else ""
    best = None
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith("."):
                hit = rel == prefix[:-1] or rel.startswith(prefix)
            else:
                hit = rel == prefix
            if hit and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[0]


def test_no_module_level_import_cycle():
    assert _cycles(_graph()) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    wrong = []
    for module, targets in _graph().items():
        mine = layer_of(module)
        for target in targets:
            if layer_of(target) > mine:
                wrong.append(
                    f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert wrong == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of(f"{ROOT}.data.manifest") > layer_of(f"{ROOT}.registry")
    assert layer_of(f"{ROOT}.evaluation.protocols") > layer_of(f"{ROOT}.modalities.depth")
    assert layer_of(f"{ROOT}.cli") > layer_of(f"{ROOT}.train") > layer_of(f"{ROOT}.cache")


def test_registries_are_leaves():
    for leaf in LEAVES:
        name = f"{ROOT}.{leaf}"
        imports = [n for n in ast.walk(TREES[name]) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [t for node in imports for t in _targets(name, node)] == [], name


# Imported where they are used, not on import: optional, or heavy and needed by one report;
# open_clip and timm import all of torchvision (seconds per interpreter): only once an anchor
# or an encoder block is built.
OPTIONAL_HEAVY = {
    "matplotlib",
    "scipy",
    "webdataset",
    "tensorboard",
    "h5py",
    "av",
    "open_clip",
    "timm",
}


def test_function_level_imports_are_only_for_optional_heavy_dependencies():
    found = []
    for module, tree in TREES.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    tops = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    tops = {ROOT} if node.level else {(node.module or "").split(".")[0]}
                else:
                    continue
                if tops - OPTIONAL_HEAVY:
                    found.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []


# ------------------------------------------------------------------------ modality names


def _literal_names(node: ast.AST, names: set[str]) -> list[str]:
    """Registered names among the string constants of a literal (or a literal collection)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value in names else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for e in node.elts for n in _literal_names(e, names)]
    return []


def _pattern_names(pattern: ast.AST, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(pattern):
        if isinstance(node, ast.MatchValue):
            found += _literal_names(node.value, names)
    return found


def name_comparisons(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison with a string literal that is a modality name:
    ``==``, ``!=``, ``is`` against it, ``in``/``not in`` a literal collection holding it (or
    a substring test of it), and ``match`` cases. A literal on the left of ``in`` a computed
    container (``"vision" in sample``) is a key lookup, not a comparison, and is allowed."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for left, op, right in zip(operands, node.ops, operands[1:]):
                if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)):
                    hits = _literal_names(left, names) + _literal_names(right, names)
                elif isinstance(op, (ast.In, ast.NotIn)):
                    hits = _literal_names(right, names)
                    if isinstance(right, (ast.Tuple, ast.List, ast.Set, ast.Constant)):
                        hits += _literal_names(left, names)  # both sides literal
                else:
                    hits = []
                found += [(node.lineno, h) for h in hits]
        elif isinstance(node, ast.Match):
            for case in node.cases:
                found += [(node.lineno, h) for h in _pattern_names(case.pattern, names)]
    return found


def test_the_name_checker_catches_branches_and_allows_keys():
    names = {"audio", "depth", "vision"}
    src = """
if m == "audio": pass
if "depth" != spec.name: pass
if m in ("depth", "x"): pass
if m not in ["vision"]: pass
match m:
    case "audio" | "other":
        pass
if "vision" in sample: pass
x = sample["audio"]
y = {"depth": 1}
for k in ("vision", "audio"): pass
if m == "photo": pass
"""
    assert sorted(name_comparisons(ast.parse(src), names)) == [
        (2, "audio"),
        (3, "depth"),
        (4, "depth"),
        (5, "vision"),
        (6, "audio"),
    ]


def test_no_branch_on_a_modality_name_outside_the_modality_files():
    names = set(list_modalities())
    assert {"vision", "text", "audio", "depth", "thermal", "imu"} <= names
    offenders = []
    for module, tree in TREES.items():
        if module == f"{ROOT}.modalities" or module.startswith(f"{ROOT}.modalities."):
            continue
        where = MODULES[module].relative_to(PACKAGE.parent)
        offenders += [
            f"{where}:{line} compares with {name!r}" for line, name in name_comparisons(tree, names)
        ]
    assert offenders == [], "\n".join(offenders)


# ----------------------------------------------------------------------- evaluation mode


def _dataset_classes():
    """The public torch Dataset classes of the data layer and of the anchor cache (which wraps
    training sets)."""
    modules = [m for m in MODULES if m.startswith(f"{ROOT}.data.")] + [f"{ROOT}.cache"]
    for name in modules:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if (
                cls.__module__ == name
                and issubclass(cls, torch.utils.data.Dataset)
                and not cls_name.startswith("_")
            ):
                yield cls


def test_every_dataset_class_has_an_evaluation_mode():
    classes = list(_dataset_classes())
    expected = {
        "PairedAudioImages",
        "ClipSet",
        "SceneSet",
        "RecordDataset",
        "BadInputDataset",
        "ShardDataset",
        "ShardStream",
        "CachedAnchorDataset",
    }
    assert expected <= {c.__name__ for c in classes}
    missing = [c.__qualname__ for c in classes if not callable(getattr(c, "eval_mode", None))]
    assert missing == []


def test_public_import_paths_still_work():
    from imagebind_lite import (  # noqa: F401
        ModalitySpec,
        build_encoder,
        list_modalities,
        load_model,
        register_modality,
        save_model,
    )
    from imagebind_lite.data.datasets import (  # noqa: F401
        BadSample,
        DatasetBundle,
        EpochRandom,
        collate,
        get_dataset_builder,
        register_dataset,
    )
    from imagebind_lite.modalities import (  # noqa: F401
        _REGISTRY,
        get_modality,
        import_modality_file,
        resolve_size,
    )


MAX_FUNCTION_LINES = 80


def long_functions(paths) -> list[str]:
    """``path:line name (N lines)`` for each function or method longer than the ceiling."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    paths = [*PACKAGE.rglob("*.py")]
    for folder in ("train", "eval", "bench"):
        paths += (REPO / folder).glob("*.py")
    assert len(paths) > 60
    assert long_functions(paths) == []


def test_the_length_checker_counts_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions([tmp_path / "long.py"]) == [
        f"{tmp_path / 'long.py'}:5 long ({MAX_FUNCTION_LINES + 1} lines)"
    ]
