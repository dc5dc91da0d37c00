"""Align any registered modality to the frozen CLIP anchor, including one from your own file.

accelerate launch train/align.py modality=imu data.dataset=manifest data.root=DATA \
    data.options.manifest=train.csv data.options.eval_manifest=test.csv
accelerate launch train/align.py modality_file=examples/my_modality.py modality=my_sensor \
    data.dataset=my_sensor_demo

No YAML is read unless --config is given: every field starts at its default in
imagebind_lite/config.py, so name the modality and the dataset (docs/extending.md).
"""

import sys

from imagebind_lite.cli import train_main


def _names_modality(argv: list[str]) -> bool:
    if any(a in ("-h", "--help") for a in argv):
        return True
    return any(a.startswith(("modality=", "--config")) for a in argv)


if __name__ == "__main__":
    if not _names_modality(sys.argv[1:]):
        sys.stderr.write(
            "error: align.py: name the modality, e.g. modality=imu, or "
            "modality_file=my_modality.py modality=my_sensor (or give --config FILE)\n"
        )
        sys.exit(2)
    train_main(None)  # no configs/ file: fields start at the dataclass defaults
