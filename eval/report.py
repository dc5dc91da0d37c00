"""Write a run's evaluation report: metrics.json, report.md and PNG plots.

python eval/report.py --checkpoint runs/audio-avmnist [--out DIR] [--linear-probe]

The folder (default RUN/report) holds the confusion matrix, per-class accuracy, a similarity
matrix of a sample batch, a PCA projection of the shared space, retrieval tables with example
top-k lists, the geometry of the space, the limitation-probe table and the training curve.
"""

from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, device_arg, one_line_errors
from imagebind_lite.evaluation.report import build_report
from imagebind_lite.evaluation.space import Space


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder (runs/NAME)")
    parser.add_argument("--out", help="report folder (default RUN/report)")
    parser.add_argument("--sample", type=int, default=12, help="rows of the similarity plots")
    parser.add_argument("--topk", type=int, default=5, help="length of the example lists")
    parser.add_argument("--templates", help="prompt templates (default: the run's)")
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="also fit few-shot linear probes on the training split",
    )
    parser.add_argument("--shots", default="1,5,10,all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    shots = [None if s == "all" else int(s) for s in args.shots.split(",")]
    with one_line_errors():
        space = Space.from_runs([args.checkpoint], args.device, trust_code=args.trust_code)
        metrics = build_report(
            space,
            args.checkpoint,
            args.out,
            not args.no_probes,
            args.linear_probe,
            args.sample,
            args.topk,
            args.batch_size,
            not args.no_progress,
            args.templates,
            shots,
        )
    zs = metrics.get("zero_shot")
    if zs:
        print(f"zero-shot top-1 {100 * zs['top1']:.1f}%, top-5 {100 * zs['top5']:.1f}%")
    out = args.out or f"{args.checkpoint}/report"
    print(f"wrote {out}/report.md, {out}/metrics.json and {len(metrics['plots'])} plots")
    return metrics


if __name__ == "__main__":
    main()
