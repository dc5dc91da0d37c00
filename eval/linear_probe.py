"""Few-shot linear probes on frozen embeddings (logistic regression, k shots per class).

python eval/linear_probe.py --checkpoint runs/audio-avmnist              # train split -> test split
python eval/linear_probe.py --checkpoint RUN --dataset esc50 --root ESC-50-master --shots 1,2,4,8
python eval/linear_probe.py --checkpoint RUN --dataset sund --root SUNRGBD

ESC-50 follows its 5-fold protocol (each fold tested once, the others train; the mean over
folds). Other protocols train on the layout's train split and test on its test split. Weight
decay is chosen on a validation part of the training data; k-shot runs average --seeds draws.
"""

from pathlib import Path

import torch

from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, device_arg, one_line_errors
from imagebind_lite.data.adapters import read_layout
from imagebind_lite.evaluation.linear_probe import (
    DEFAULT_GRID,
    folded_linear_probe,
    format_linear_probe,
    linear_probe,
)
from imagebind_lite.evaluation.protocols import (
    embed_records,
    get_protocol,
    parse_options,
    prepare_records,
    run_bundle,
    run_collections,
    run_train_collection,
)
from imagebind_lite.evaluation.report import write_json
from imagebind_lite.evaluation.space import Space


def embed_split(space, protocol, root, options, args, tag):
    records, names = read_layout(protocol.layout, root, **options)
    records, labels, classnames, _ = prepare_records(protocol, records, names)
    if protocol.task != "classification":
        raise ValueError(f"{protocol.name}: linear probes need single-label classes")
    cache = f"{args.embeddings_cache}.{tag}.safetensors" if args.embeddings_cache else None
    emb, kept, _, _ = embed_records(
        space,
        protocol.modality,
        records,
        root,
        args.batch_size,
        args.num_workers,
        not args.no_progress,
        cache,
        f"{protocol.name}-{tag}",
    )
    kept_list = kept.tolist()
    return (
        emb,
        torch.tensor([labels[i] for i in kept_list]),
        [records[i].fold for i in kept_list],
        classnames,
    )


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--dataset",
        help="a classification protocol (esc50, vggsound, sund, "
        "nyud, llvip); default: the run's own splits",
    )
    parser.add_argument("--root")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shots", default="1,5,10,all", help="shots per class; all = every item")
    parser.add_argument("--seeds", type=int, default=3, help="draws of the shots per k")
    parser.add_argument(
        "--grid",
        default=",".join(str(g) for g in DEFAULT_GRID),
        help="weight decays to choose from",
    )
    parser.add_argument("--embeddings-cache", help="file prefix to reuse embeddings from")
    parser.add_argument("--out", help="JSON output (default RUN/eval/linear_probe_NAME.json)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    shots = [None if s.strip() == "all" else int(s) for s in args.shots.split(",")]
    grid = [float(g) for g in args.grid.split(",")]
    probe_args = dict(shots=shots, seeds=args.seeds, grid=grid)
    with one_line_errors():
        space = Space.from_runs([args.checkpoint], args.device, trust_code=args.trust_code)
        if args.dataset:
            if not args.root:
                parser.error("--dataset needs --root DIR")
            protocol = get_protocol(args.dataset)
            root = Path(args.root)
            options = {**protocol.layout_options, **parse_options(args.option)}
            if protocol.group_by == "fold":
                x, y, folds, classnames = embed_split(space, protocol, root, options, args, "all")
                results = folded_linear_probe(
                    x, y, folds, num_classes=len(classnames), **probe_args
                )
            else:
                train = embed_split(
                    space, protocol, root, {**options, "split": "train"}, args, "train"
                )
                test = embed_split(space, protocol, root, options, args, "test")
                classnames = test[3]
                results = linear_probe(
                    train[0], train[1], test[0], test[1], len(classnames), **probe_args
                )
            name = protocol.name
        else:
            built = run_bundle(args.checkpoint, space.anchor)
            train, classnames = run_train_collection(
                space, args.checkpoint, args.batch_size, not args.no_progress, built=built
            )
            colls, info = run_collections(
                space, args.checkpoint, None, args.batch_size, not args.no_progress, built=built
            )
            test = colls[info["modality"]]
            if not classnames or test.labels is None:
                raise ValueError(f"{args.checkpoint}: the run's dataset has no class labels")
            results = linear_probe(
                train.embeddings,
                train.labels,
                test.embeddings,
                test.labels,
                len(classnames),
                **probe_args,
            )
            name = "run"
    print(format_linear_probe(results, f"{name}: few-shot linear probe (top-1 %)"))
    out = Path(args.out or Path(args.checkpoint) / "eval" / f"linear_probe_{name}.json")
    write_json(out, {"checkpoint": args.checkpoint, "dataset": name, "results": results})
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
