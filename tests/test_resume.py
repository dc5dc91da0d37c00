"""--resume continues the run as it was trained: a config that changes the model, the data, the
loss or the optimizer is refused in one line naming the fields, as are a checkpoint of another
global batch and one whose tensors do not fit; how far the run goes may change."""

import json

import pytest
import yaml
from conftest import REPO, tiny_overrides

from imagebind_lite.config import ConfigError, load_config
from imagebind_lite.train import train

RUN = "depth-synthetic_scenes"


def config_args(out, *extra) -> list[str]:
    return tiny_overrides(
        out,
        "data.batch_size=16",
        "data.preprocess={image_size: 32}",
        "data.options={train_size: 128, test_size: 32}",
        "checkpoint_every=2",
        "optim.max_steps=2",
        *extra,
    )


def config(out, *extra):
    return load_config(REPO / "configs/depth.yaml", config_args(out, *extra))


@pytest.fixture
def trained(tmp_path):
    train(config(tmp_path), quiet=True)
    return tmp_path


@pytest.mark.parametrize(
    "change, says",
    [
        ("encoder.overrides={depth: 1, width: 64, heads: 2}", "encoder.overrides.width: 32 -> 64"),
        ("optim.lr=1e-2", "optim.lr: 0.002 -> 0.01"),
        ("data.options={train_size: 96, test_size: 32}", "data.options.train_size: 128 -> 96"),
        ("seed=1", "seed: 0 -> 1"),
    ],
)
def test_a_resume_that_changes_the_run_is_refused_naming_the_field(trained, change, says):
    with pytest.raises(ConfigError) as err:
        train(config(trained, change), resume=True, quiet=True)
    message = str(err.value)
    assert message.startswith("--resume: this config changes what the run was trained with (")
    assert says in message and f"--config {trained / RUN / 'config.yaml'}" in message
    assert "\n" not in message


def test_a_resume_may_go_further_and_with_the_saved_config(trained):
    saved = trained / RUN / "config.yaml"
    metrics = train(config(trained, "optim.max_steps=4"), resume=True, quiet=True)
    assert metrics["steps"] == 4
    assert yaml.safe_load(saved.read_text())["optim"]["max_steps"] == 4
    # The saved config.yaml, given as --config, resumes as it is.
    again = load_config(saved, ["optim.max_steps=6"])
    assert train(again, resume=True, quiet=True)["steps"] == 6


def test_a_checkpoint_of_another_global_batch_is_refused(trained):
    # data.batch_size may change (a resume on another number of processes), the global batch not.
    with pytest.raises(ConfigError, match=r"global batch of 16; this run's is 32 \(32 per process"):
        train(config(trained, "data.batch_size=32"), resume=True, quiet=True)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(trained):
    saved = trained / RUN / "config.yaml"
    edited = yaml.safe_load(saved.read_text())
    edited["encoder"]["overrides"]["width"] = 64  # an edited config.yaml: the check cannot see it
    saved.write_text(yaml.safe_dump(edited))
    with pytest.raises(ConfigError) as err:
        train(config(trained, "encoder.overrides={depth: 1, width: 64, heads: 2}"), resume=True)
    message = str(err.value)
    assert message.startswith(f"--resume: {trained / RUN / 'checkpoints'}/step_00000002")
    assert "does not fit this run: size mismatch for " in message and "\n" not in message
    assert (
        json.loads((trained / RUN / "checkpoints/step_00000002/state.json").read_text())[
            "global_batch"
        ]
        == 16
    )


def test_resume_auto_starts_a_new_run_then_resumes_it(tmp_path, capsys):
    from imagebind_lite.cli import train_main

    first = train(config(tmp_path), resume="auto", quiet=True)  # no run yet: a new one
    assert first["run_dir"] == str(tmp_path / RUN) and first["steps"] == 2
    assert "no complete checkpoint" not in capsys.readouterr().out
    # The same command again (a requeued job), through the script's parser: it resumes.
    again = train_main(
        "depth.yaml", ["--resume", "auto", *config_args(tmp_path, "optim.max_steps=4")]
    )
    assert again["run_dir"] == first["run_dir"] and again["steps"] == 4
    assert "from step 2" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN]  # no second run folder
