"""Limitation probes of the shared space: negation, counting, spatial relations, abstract and
rare concepts.

python eval/probes.py --checkpoint runs/audio-avmnist [--checkpoint runs/depth-...] [--out FILE]

Item probes (an image / clip / depth map and a true and a false text; chance 50%) use the
run's own data where it is AV-MNIST digits, and scenes rendered with known shape counts and
positions for images and depth/thermal encoders; text probes report how often two texts of
different meaning stay apart (cosine below --threshold).
"""

from pathlib import Path

from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, device_arg, one_line_errors
from imagebind_lite.evaluation.probes import as_dicts, format_probe_table, run_probes
from imagebind_lite.evaluation.protocols import run_collections
from imagebind_lite.evaluation.report import run_normalisation, write_json
from imagebind_lite.evaluation.space import Space


def main(argv=None) -> list:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a run folder; repeat for several modalities",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="text probes: a pair is told apart below this cosine",
    )
    parser.add_argument("--scenes", type=int, default=200, help="rendered scenes per probe")
    parser.add_argument("--out", help="JSON output (default FIRST_RUN/eval/probes.json)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with one_line_errors():
        space = Space.from_runs(args.checkpoint, args.device, trust_code=args.trust_code)
        run = args.checkpoint[0]
        colls, info = run_collections(space, run, None, args.batch_size, not args.no_progress)
        normalisation = {}
        for modality, folder in space.runs.items():
            normalisation.update(run_normalisation(folder, space, modality))
        results = run_probes(space, colls, info, normalisation, args.scenes, args.threshold)
    print(format_probe_table(results))
    out = Path(args.out) if args.out else Path(run) / "eval" / "probes.json"
    write_json(out, {"checkpoints": args.checkpoint, "probes": as_dicts(results)})
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
