"""Zero-shot classification of a trained run by text prompts (top-1, top-5).

python eval/zero_shot.py --checkpoint runs/audio-avmnist              # the run's own test split
python eval/zero_shot.py --checkpoint RUN --dataset esc50 --root ESC-50-master
python eval/zero_shot.py --checkpoint RUN --dataset nyud --root NYUD --templates imagenet
python eval/zero_shot.py --list                                       # protocols and references

Prints a table beside the published numbers and writes JSON (default RUN/eval/zero_shot_NAME.json).
"""

from pathlib import Path

from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, device_arg, one_line_errors
from imagebind_lite.evaluation.protocols import (
    PROTOCOLS,
    evaluate_protocol,
    evaluate_run,
    format_table,
    parse_options,
)
from imagebind_lite.evaluation.report import write_json
from imagebind_lite.evaluation.space import Space


def list_protocols() -> None:
    for p in PROTOCOLS.values():
        refs = ", ".join(f"{r.model} {r.metric} {r.value}" for r in p.references)
        print(f"{p.name:10} {p.modality:8} layout {p.layout:10} {refs}\n{'':10} {p.test_set}")


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a run folder (runs/NAME) or its model/ folder")
    parser.add_argument(
        "--dataset",
        help=f"a protocol: {', '.join(PROTOCOLS)} (default: the run's own evaluation split)",
    )
    parser.add_argument("--root", help="the dataset folder, in the dataset's own layout")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="layout option, e.g. fold=1 or split=test (repeatable)",
    )
    parser.add_argument(
        "--templates",
        help="template set (imagenet, plain, ...) or templates "
        "separated by '|' (default: the protocol's / run's)",
    )
    parser.add_argument(
        "--embeddings-cache",
        help="with --dataset: a safetensors file to save embeddings to and reuse "
        "them from while the model and the file list are unchanged",
    )
    parser.add_argument("--out", help="JSON output (default RUN/eval/zero_shot_NAME.json)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list", action="store_true", help="list the protocols and exit")
    args = parser.parse_args(argv)
    if args.list:
        list_protocols()
        return {}
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    if args.dataset and not args.root:
        parser.error("--dataset needs --root DIR")
    progress = not args.no_progress
    with one_line_errors():
        space = Space.from_runs([args.checkpoint], args.device, trust_code=args.trust_code)
        if args.dataset:
            result = evaluate_protocol(
                args.dataset,
                args.root,
                space,
                parse_options(args.option),
                args.templates,
                args.batch_size,
                args.num_workers,
                progress,
                args.embeddings_cache,
            )
        else:
            result = evaluate_run(space, args.checkpoint, args.templates, args.batch_size, progress)
    print(format_table(result))
    run = Path(args.checkpoint)
    out = Path(args.out) if args.out else run / "eval" / f"zero_shot_{args.dataset or 'run'}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
