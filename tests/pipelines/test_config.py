"""Configuration loading: YAML + overrides, and a clear ConfigError naming the field for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mgpo.cli import app
from mgpo.pipelines.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # configs name example data relative to the repository root
    if "tune:" in path.read_text():  # mgpo tune's configs: checked whole by load_tune; mgpo train warns
        from mgpo.pipelines.tune import load_tune

        assert load_tune(path).space
        with pytest.warns(UserWarning, match="its tune: section is read by `mgpo tune` only"):
            cfg = load_config(path)
    else:
        cfg = load_config(path)
    assert cfg.training.output_dir


def test_overrides_win_over_the_file_and_keep_types():
    cfg = load_config(CONFIGS[0], ["training.lr=3e-4", "adapter.method=dora", "perturbation.rho=0.1"])
    assert cfg.training.lr == 3e-4 and cfg.adapter.method == "dora" and cfg.perturbation.rho == 0.1


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["training.lrr=1"], "lrr"),  # unknown key
        (["training.batch_size=abc"], "batch_size"),  # wrong type
        (["training.batch_size=0"], "training.batch_size"),  # out of range
        (["training.lr=-1"], "training.lr"),
        (["training.warmup_ratio=1.5"], "training.warmup_ratio"),
        (["data.task=translation"], "data.task"),
        (["data.val_fraction=0.6", "data.test_fraction=0.5"], "val_fraction"),
        (["data.val_fraction=0"], "data.val_fraction"),  # the data loader refuses it too: refused up front
        (["adapter.method=qlora"], "method"),
        (["adapter.rank=0"], "rank"),
        (["perturbation.method=adam"], "method"),
        (["perturbation.rho=-0.1"], "rho"),
        (["perturbation.apn=sqrt"], "apn"),
        (["generation.benchmark=bleu"], "generation.benchmark"),
        (["data.task=causal-lm", "model.name=minilm"], "model.name"),  # incompatible choices
        (["data.name=arithmetic"], "data.task"),
        (["lr"], "section.field=value"),
        (["perturbation.profile=nlu", "training.optim=sgd"], "training.optim"),  # the profile's beta1: nowhere to go
    ],
)
def test_bad_values_raise_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_file_or_override_that_is_not_yaml_is_a_config_error_saying_where(tmp_path):
    from mgpo.pipelines.sweep import load_sweep

    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {lr: [1e-3}\n")
    for load in (load_config, load_sweep):  # a training config and a sweep spec
        with pytest.raises(ConfigError, match=r"'.*bad\.yaml' is not valid YAML: .*line 1, column 21"):
            load(bad)
    with pytest.raises(ConfigError, match=r"override 'training\.lr=\[1': its value is not valid YAML"):
        load_config(None, ["training.seed=3", "training.lr=[1"])
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output and "not valid YAML" in result.output


def test_cli_reports_config_errors_without_a_traceback():
    result = CliRunner().invoke(app, ["config", "training.batch_size=0"])
    assert result.exit_code == 2
    assert "training.batch_size=0 is invalid" in result.output
    assert "Traceback" not in result.output


def test_cli_config_prints_the_resolved_yaml():
    result = CliRunner().invoke(app, ["config", str(CONFIGS[0]), "training.lr=0.002"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.002" in result.output


def test_cli_config_says_what_the_profile_and_the_preset_resolve_to():
    """rho and beta are null in the config when a profile sets them: shown as what they resolve to and why, and the
    printed YAML still loads as the same config."""
    from omegaconf import OmegaConf

    result = CliRunner().invoke(
        app, ["config", "perturbation.profile=nlg", "perturbation.preset=msam"], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  rho: null  # resolves to 0.01 (profile nlg)" in lines
    assert "  beta: null  # resolves to 0.8 (profile nlg)" in lines
    assert "  apn: inverse  # resolves to off (preset msam)" in lines
    assert "  profile: nlg  # also sets the base optimizer's beta1 (the paper's mu) to 0.8" in lines
    assert "  max_scale: 10.0" in lines  # a field neither sets is shown as it is
    assert OmegaConf.create(result.output).perturbation.rho is None


def test_cli_explains_every_field_with_its_help():
    import dataclasses

    from mgpo.pipelines.config import TrainConfig

    result = CliRunner().invoke(app, ["config", "--explain"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"
            assert f"{section.name}.{f.name}" in result.output
    # CliRunner's output is not a terminal: one tab-separated line per field, so `| grep` finds a field whole
    lines = {line.split("\t")[0]: line.split("\t") for line in result.output.splitlines()}
    assert lines["training.max_steps"][1:] == [
        "-1",
        TrainConfig().training.__dataclass_fields__["max_steps"].metadata["help"],
    ]


@pytest.mark.parametrize(
    "overrides,suggestion",
    [
        (["training.learning_rate=1e-3"], "training.lr"),  # Hugging Face's name
        (["lr=1e-3"], "training.lr"),  # section left out
        (["lr"], "training.lr"),  # not even an override
        (["training.batchsize=8"], "training.batch_size"),  # misspelt
    ],
)
def test_unknown_fields_get_a_did_you_mean(overrides, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean {suggestion.replace('.', chr(92) + '.')}\b"):
        load_config(None, overrides)


def test_a_data_path_that_does_not_exist_is_a_config_error(tmp_path):
    missing = tmp_path / "nope" / "reviews.csv"
    result = CliRunner().invoke(app, ["config", f"data.name={missing}"], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert "data.name=" in result.output and "no such file or folder" in result.output
    (tmp_path / "nope").mkdir()
    missing.write_text("text,label\na,1\n")
    assert CliRunner().invoke(app, ["config", f"data.name={missing}"]).exit_code == 0


def test_config_checks_columns_and_labels_of_local_files_without_the_ml_stack(tmp_path):
    import subprocess
    import sys

    (tmp_path / "train.csv").write_text("review,sentiment\na,pos\nb,neg\n")
    (tmp_path / "test.csv").write_text("review,sentiment\nc,meh\n")
    base = ["config", f"data.name={tmp_path}", "data.text_column=review"]
    result = CliRunner().invoke(app, [*base, "data.label_column=stars"], terminal_width=300)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "no column 'stars'" in said and "data.label_column=" in said
    result = CliRunner().invoke(app, [*base, "data.label_column=sentiment"], terminal_width=300)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "label 'meh'" in said and "test.csv" in said
    (tmp_path / "test.csv").write_text("review,sentiment\nc,neg\n")
    code = (
        "import sys; from mgpo.cli import main; sys.argv = ['mgpo', 'config', sys.argv[1], sys.argv[2], "
        "'data.label_column=sentiment']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\nassert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code, base[1], base[2]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.lr=inf", "training.lr"),
        ("training.weight_decay=inf", "training.weight_decay"),
        ("training.epochs=inf", "training.epochs"),
        ("perturbation.rho=nan", "perturbation.rho"),
        ("training.max_steps=-5", "training.max_steps"),
    ],
)
def test_non_finite_and_out_of_range_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key}="):
        load_config(None, [override])


def test_max_steps_zero_means_epochs(tmp_path):
    from mgpo.pipelines.train import training_arguments

    cfg = load_config(None, ["training.max_steps=0", "training.epochs=2"])
    assert training_arguments(cfg, tmp_path, has_eval=False).max_steps == -1
