"""The supervised ceiling of an alignment config: the same encoder, data, augmentation and steps
trained on the class labels with cross-entropy, scored on the same held-out split.

python eval/ceiling.py --config configs/audio.yaml
python eval/ceiling.py --config configs/audio.yaml --checkpoint runs/audio-avmnist

Takes the training scripts' ``field=value`` overrides. The last stdout line is JSON with
``supervised_top1``; with ``--checkpoint RUN`` (an aligned run of the same config) also
``emergent_top1`` (its zero-shot top-1 on the same split) and ``emergence_gap`` (the difference).
Writes runs/ceiling-<modality>-<dataset>/metrics.json.
"""

import json

from imagebind_lite.ceiling import ceiling
from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, one_line_errors
from imagebind_lite.config import load_config, resolve_config_arg

KEYS = ("supervised_top1", "supervised_top5", "emergent_top1", "emergence_gap", "train_seconds")


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a training config (default: configs/audio.yaml)")
    parser.add_argument("--checkpoint", help="an aligned run of the same config, to compare")
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg = load_config(resolve_config_arg(args.config, "audio.yaml"), args.overrides)
        metrics = ceiling(cfg, args.checkpoint, args.trust_code)
    if metrics:
        shown = {k: metrics[k] for k in KEYS if k in metrics}
        print(json.dumps({**shown, "run_dir": metrics["run_dir"]}))
    return metrics


if __name__ == "__main__":
    main()
