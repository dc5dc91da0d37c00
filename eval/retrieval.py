"""Cross-modal retrieval between any two modalities: R@1/5/10 and median rank.

python eval/retrieval.py --checkpoint runs/audio-avmnist                # the run's test split
python eval/retrieval.py --checkpoint RUN --dataset clotho --root CLOTHO  # text<->audio
python eval/retrieval.py --checkpoint DEPTH_RUN --checkpoint THERMAL_RUN  # emergent depth<->thermal
python eval/retrieval.py --checkpoint AUDIO_RUN --checkpoint DEPTH_RUN --manifest pairs.csv
python eval/retrieval.py --bound runs/bind-audio-pen/model --pair audio pen  # emergent, by class

Rows pair by id (paired data; several captions per clip count as one item's positives) or,
where the two sides share no ids, by class. With several runs, their data join on sample ids:
two runs' encoders on paired data give the emergent pairs (audio<->depth, depth<->thermal) that
no encoder was trained on. Directions default to every pair the data allow.

``--bound DIR --pair A B``: two modalities of a bound model (``train/bind.py``), each on its own
held-out set (rebuilt from the data its config records), matched by class: top-1 same-class
match and mAP (relevant = same class), both directions.
"""

from pathlib import Path

from imagebind_lite.bind import format_emergent, pair_retrieval
from imagebind_lite.bound import HUB_PREFIX, BoundModel
from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, device_arg, one_line_errors
from imagebind_lite.data.adapters import read_layout
from imagebind_lite.evaluation.protocols import (
    cross_modal_retrieval,
    format_retrieval,
    layout_for,
    parse_options,
    record_collections,
    run_collections,
)
from imagebind_lite.evaluation.report import write_json
from imagebind_lite.evaluation.space import Space


def parse_directions(text):
    if not text:
        return None
    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition(":")
        if not sep:
            a, sep, b = part.strip().partition("->")
        if not sep or not a or not b:
            raise ValueError(f"direction {part!r} is not QUERY:GALLERY (e.g. audio:vision)")
        out.append((a.strip(), b.strip()))
    return out


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        action="append",
        help="a run folder; repeat for several modalities",
    )
    parser.add_argument("--bound", help="a bound model folder (train/bind.py); with --pair")
    parser.add_argument("--pair", nargs=2, metavar=("A", "B"), help="two of its modalities")
    parser.add_argument(
        "--dataset",
        help="a protocol (clotho, audiocaps, sund, ...) or layout "
        "(sunrgbd, nyud, llvip, audioset, ...)",
    )
    parser.add_argument("--root", help="dataset folder (for --dataset / --manifest)")
    parser.add_argument("--manifest", help="a CSV/JSONL manifest of paired files")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="layout option (repeatable)",
    )
    parser.add_argument("--directions", help="e.g. audio:vision,vision:audio,text:audio")
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument(
        "--embeddings-cache",
        metavar="PREFIX",
        help="reuse/save embeddings as PREFIX.<modality>.safetensors",
    )
    parser.add_argument("--out", help="JSON output (default FIRST_RUN/eval/retrieval_NAME.json)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.bound or args.pair:
        if not (args.bound and args.pair) or args.checkpoint:
            parser.error("--bound DIR takes --pair A B (and no --checkpoint)")
    elif not args.checkpoint:
        parser.error("give --checkpoint RUN (repeatable) or --bound DIR --pair A B")
    elif args.dataset and not args.manifest and not args.root:
        parser.error("--dataset needs --root DIR")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.bound:
        return bound_pair(args)
    progress = not args.no_progress
    ks = [int(k) for k in args.ks.split(",")]
    with one_line_errors():
        space = Space.from_runs(args.checkpoint, args.device, trust_code=args.trust_code)
        if args.dataset or args.manifest:
            collections, name = dataset_collections(space, args, progress)
        else:
            collections, name = {}, "run"
            for run in args.checkpoint:
                colls, _ = run_collections(
                    space, run, None, args.batch_size, progress, args.num_workers
                )
                for modality, coll in colls.items():
                    collections.setdefault(modality, coll)
        results = cross_modal_retrieval(
            collections, parse_directions(args.directions), ks, progress
        )
    print(format_retrieval(results, ks))
    out = Path(args.out or Path(args.checkpoint[0]) / "eval" / f"retrieval_{name}.json")
    write_json(out, {"checkpoints": args.checkpoint, "dataset": name, "retrieval": results})
    print(f"wrote {out}")
    return results


def dataset_collections(space, args, progress: bool) -> tuple[dict, str]:
    """(modality -> collection, name) of the records of ``--manifest`` or ``--dataset``."""
    if args.manifest:
        from imagebind_lite.data.manifest import read_manifest

        root = Path(args.root) if args.root else Path(args.manifest).parent
        records, _ = read_manifest(args.manifest, root)
        name = Path(args.manifest).stem
    else:
        layout, options = layout_for(args.dataset)
        root = Path(args.root)
        records, _ = read_layout(layout, root, **{**options, **parse_options(args.option)})
        name = args.dataset
    collections = record_collections(
        space,
        records,
        root,
        None,
        args.batch_size,
        args.num_workers,
        progress,
        args.embeddings_cache,
    )
    return collections, name


def bound_pair(args) -> dict:
    a, b = args.pair
    with one_line_errors():
        bound = BoundModel.from_pretrained(
            args.bound, args.device, trust_code=args.trust_code, modalities=[a, b]
        )
        results = pair_retrieval(bound, a, b, args.batch_size)
    print(format_emergent(a, b, results))
    # A model from the Hub (hf-hub:ORG/NAME) has no folder of ours: its results go to ./eval/.
    home = Path(".") if args.bound.startswith(HUB_PREFIX) else Path(args.bound)
    out = Path(args.out or home / "eval" / f"retrieval_{a}_{b}.json")
    write_json(out, {"bound": args.bound, "pair": [a, b], "retrieval": results})
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
