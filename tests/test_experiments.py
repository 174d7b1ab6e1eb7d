"""Configs, the fit/study commands and the examples all run (tiny step counts) and do what they say."""

from __future__ import annotations

import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from graddiag import GradientDiagnostics
from graddiag.cli import main as cli_main
from graddiag.lightning.fit import diagnostics_of, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
         "--diagnostics.print_summary", "false"]


def _expected(config: Path) -> set[str]:
    match = re.search(r"^# expect: (.+)$", config.read_text(), re.MULTILINE)
    assert match, f"{config.name} must say what it should find ('# expect: ...')"
    return set() if match.group(1).strip() == "none" else set(match.group(1).split("|"))


def test_there_is_a_config_per_pathology_and_healthy_baselines() -> None:
    expectations = [_expected(c) for c in CONFIGS]
    for kind in ("vanishing", "saturated", "dead_relu", "no_gradient", "exploding"):
        assert any(kind in e for e in expectations), kind
    assert sum(1 for e in expectations if not e) >= 3  # quickstart + two healthy baselines


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_produces_its_expected_findings(config: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = _expected(config)
    healthy = not expected
    steps = "300" if healthy else "60"
    cli = run_cli(["fit", "--config", str(config), "--trainer.max_steps", steps,
                   "--trainer.max_epochs", "20", *QUIET])
    found = {f.kind for f in diagnostics_of(cli).findings}
    if healthy:
        assert found == set()
    else:
        assert found & expected, f"{config.name}: expected one of {expected}, found {found}"


def test_command_line_overrides_reach_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"),
                   "--model.activation", "tanh", "--trainer.max_steps", "2", *QUIET])
    assert cli.model.hparams.activation == "tanh"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["--diagnostics.every_n_steps", "ten"], "every_n_steps"),
        (["--diagnostics.on_nonfinite", "panic"], "on_nonfinite"),
        (["--diagnostics.every_n_stepz", "3"], "every_n_stepz"),
        (["--model.activation", "swish"], "activation"),
    ],
)
def test_bad_config_values_are_rejected_before_training(override: list[str], named: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *override, *QUIET])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


BAD_VALUES = [
    (["--diagnostics.every_n_steps", "0"],
     "--diagnostics.every_n_steps must be an integer >= 1, got 0"),
    (["--diagnostics.vanishing_rel", "5"],
     "--diagnostics.vanishing_rel must be a number in [0.0, 1.0], got 5.0"),
    (["--diagnostics.ignore", "[vanish]"],
     "--diagnostics.ignore must be a list of finding kinds from ['vanishing', 'exploding', "
     "'nonfinite', 'no_gradient', 'saturated', 'dead_relu', 'stalled', 'unstable_update', "
     "'not_in_optimizer'] (or one of them), got ['vanish']"),
    (["--diagnostics.every_n_steps", "ten"],
     "--diagnostics.every_n_steps must be an integer >= 1, got ten"),
    (["--diagnostics.on_nonfinite", "panic"],
     "--diagnostics.on_nonfinite must be one of ['warn', 'raise', 'stop', 'skip'], got panic"),
    (["--diagnostics.log_every_n_steps", "x"],
     "--diagnostics.log_every_n_steps must be an integer >= 1 or None, got x"),
    (["--diagnostics.figure_every_n_steps", "-1"],
     "--diagnostics.figure_every_n_steps must be an integer >= 0 or None, got -1"),
]


@pytest.mark.parametrize(("override", "line"), BAD_VALUES)
def test_a_bad_diagnostics_value_is_one_line_and_exit_status_2(
    override: list[str], line: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *override, *QUIET])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"graddiag fit: error: {line}"]
    assert "Traceback" not in captured.out + captured.err


def test_a_bad_value_in_a_config_file_is_one_line_too(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text()
                      + "\ndiagnostics:\n  exploding_factor: 0.5\n")
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(config), *QUIET])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "graddiag fit: error: --diagnostics.exploding_factor must be a number > 1.0, got 0.5"]


@pytest.mark.slow  # a fresh interpreter importing Lightning
def test_graddiag_fit_command_rejects_an_out_of_range_value_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "graddiag.cli", "fit", "--config",
         str(ROOT / "configs/quickstart.yaml"), "--diagnostics.every_n_steps", "0", *QUIET],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "graddiag fit: error: --diagnostics.every_n_steps must be an integer >= 1, got 0"]


def test_good_diagnostics_values_reach_the_callback(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"),
                   "--diagnostics.norm_type", "inf", "--diagnostics.ignore", "[dead_relu]",
                   "--diagnostics.exclude", "[net.0]", "--diagnostics.on_exploding", "skip",
                   "--trainer.max_steps", "2", *QUIET])
    config = diagnostics_of(cli).config
    assert config.norm_type == math.inf and config.ignore == ("dead_relu",)
    assert config.exclude == ("net.0",) and config.on_exploding == "skip"
    assert "net.0" not in set(diagnostics_of(cli).history.layer)


def test_a_single_string_is_a_one_item_list_as_in_python(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"),
                   "--diagnostics.ignore", "dead_relu", "--diagnostics.exclude", "net.0",
                   "--trainer.max_steps", "2", *QUIET])
    config = diagnostics_of(cli).config
    assert config.ignore == ("dead_relu",) and config.exclude == ("net.0",)


def test_an_abbreviated_option_is_not_taken_for_the_full_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"),
                 "--diagnostics.every_n_step", "3", *QUIET])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --diagnostics.every_n_step 3" in capsys.readouterr().err


class _MyDiagnostics(GradientDiagnostics):
    """A user's subclass: still a second GradientDiagnostics."""


@pytest.mark.parametrize(("callbacks", "path"), [
    ("    - class_path: graddiag.GradientDiagnostics", "graddiag.GradientDiagnostics"),
    ("    - class_path: tests.test_experiments._MyDiagnostics",
     "tests.test_experiments._MyDiagnostics"),
    ("    class_path: graddiag.GradientDiagnostics",  # one callback, not in a list
     "graddiag.GradientDiagnostics"),
])
def test_a_gradient_diagnostics_or_subclass_under_trainer_callbacks_is_one_line(
        callbacks: str, path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text()
                      + "\n".join(["", "trainer:", "  callbacks:", callbacks, ""]))
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(config), *QUIET])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"graddiag fit: error: trainer.callbacks lists {path}: graddiag fit adds the one "
        "GradientDiagnostics itself; configure it in the diagnostics: section instead"]


def test_a_single_other_callback_not_in_a_list_still_runs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "one.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text()
                      + "\n".join(["", "trainer:", "  callbacks:",
                                   "    class_path: pytorch_lightning.callbacks.ModelSummary",
                                   "  max_steps: 2", ""]))
    cli = run_cli(["fit", "--config", str(config), *QUIET])
    assert len(diagnostics_of(cli).history)


@pytest.mark.parametrize(("patterns", "error"), [
    (["--diagnostics.include", "[nope*]"],
     "--diagnostics.include pattern 'nope*' matches no layer; layers are"),
    (["--diagnostics.include", "[net.0]", "--diagnostics.exclude", "[net.0]"],
     "--diagnostics.include/exclude: the patterns include=['net.0'] and exclude=['net.0'] left "
     "no layer to monitor"),
], ids=["matching-none", "leaving-none"])
def test_bad_patterns_are_one_line_with_exit_status_2_and_leave_no_logs(
        patterns: list[str], error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from graddiag.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *patterns,
              "--trainer.max_steps", "2", *QUIET[2:]])  # the config's TensorBoardLogger on
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"graddiag fit: error: {error}")
    assert "Traceback" not in err
    # found before fit starts: no logger version directory or saved config left behind
    assert [p for p in tmp_path.rglob("*") if p.name.startswith("version_")] == []
    assert list(tmp_path.rglob("config.yaml")) == []


def test_fit_help_documents_every_callback_option(capsys: pytest.CaptureFixture[str]) -> None:
    from graddiag.data.options import OPTIONS

    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    text = "".join(capsys.readouterr().out.split())  # the help wraps lines, also at hyphens
    for option in OPTIONS:
        assert f"--diagnostics.{option.name}" in text, option.name
        assert "".join(f"{option.doc} Allowed: {option.allowed}.".split()) in text, option.name


def test_study_command_writes_table_and_figure(tmp_path: Path) -> None:
    assert cli_main(["study", "--depths", "2", "8", "--steps", "60", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "activation_study.csv")
    assert len(table) == 6
    sig = table[table.activation == "sigmoid"].set_index("depth").first_to_last_grad_ratio
    assert sig[8] < sig[2] / 100  # the deeper sigmoid net starves its first layer
    assert (tmp_path / "activation_study.png").stat().st_size > 10_000


def _example(name: str, *argv: str):  # noqa: ANN202
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        module = runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="example")
    finally:
        sys.path.pop(0)
    return module["main"](list(argv))


def test_example_quickstart() -> None:
    diagnostics = _example("quickstart", "--steps", "30")
    assert any(f.kind == "vanishing" for f in diagnostics.findings)


def test_example_plain_pytorch() -> None:
    monitor = _example("plain_pytorch", "--steps", "20")
    assert sorted(monitor.history.step.unique()) == list(range(20))
    assert monitor.findings == []


def test_example_non_differentiable() -> None:
    runs = _example("non_differentiable", "--steps", "12")
    argmax = [f for f in runs["argmax"].findings if f.kind == "no_gradient"]
    assert [f.layer for f in argmax] == ["router"] and "argmax" in argmax[0].message
    for fixed in ("straight_through", "gumbel"):
        assert not [f for f in runs[fixed].findings if f.kind == "no_gradient"]


def test_example_custom_backward() -> None:
    monitor = _example("custom_backward", "--steps", "20")
    hidden = monitor.history.query("layer == 'hidden'").grad_norm
    assert (hidden > 0).all()  # the surrogate gradient reaches the layer before the step
    assert monitor.findings == []


def test_example_fix_vanishing() -> None:
    results = _example("fix_vanishing", "--epochs", "3")
    (before, acc_before), (after, acc_after) = results.values()
    assert any(f.kind == "vanishing" for f in before.findings)
    assert not any(f.kind == "vanishing" for f in after.findings)
    assert acc_after > acc_before + 0.3


def test_example_find_the_nan() -> None:
    from tests.replay_cases import line_of

    namespace = runpy.run_path(str(ROOT / "examples" / "find_the_nan.py"), run_name="example")
    results = namespace["main"](["--steps", "40"])
    plain = [f for f in results["plain"] if f.kind == "nonfinite"][0]
    assert (plain.details["file"], plain.details["line"]) == line_of(namespace["softmax"],
                                                                     "torch.exp(")
    assert plain.details["op"] == "torch.exp" and "overflowed to inf" in plain.message
    data = [f for f in results["lightning"] if f.kind == "nonfinite"][0]
    assert (data.details["phase"], data.details["tensor"]) == ("data", "batch[0]")
    assert "in the data, not in the model" in data.message


def test_bundled_data_modules_split_deterministically() -> None:
    import torch

    from graddiag.demos.data import DigitsDataModule, SyntheticDataModule

    digits = DigitsDataModule(batch_size=16, val_fraction=0.25, seed=3)
    digits.setup()
    assert len(digits.train_set) + len(digits.val_set) == 1797
    assert len(digits.val_set) == round(1797 * 0.25)
    again = DigitsDataModule(batch_size=16, val_fraction=0.25, seed=3)
    again.setup()
    assert torch.equal(digits.val_set.tensors[0], again.val_set.tensors[0])
    classes = SyntheticDataModule(task="classification", samples=100, in_features=5, num_classes=3)
    classes.setup()
    x, y = classes.train_set.tensors
    assert x.shape == (80, 5) and y.dtype == torch.long and int(y.max()) < 3
    regression = SyntheticDataModule(task="regression", samples=50, in_features=4, num_classes=2)
    regression.setup()
    assert regression.train_set.tensors[1].shape == (40, 2)
    with pytest.raises(ValueError, match="task must be 'classification' or 'regression', got 'rank'"):
        SyntheticDataModule(task="rank")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction must be in \\[0, 1\\), got 1.5"):
        DigitsDataModule(val_fraction=1.5)


def test_the_readme_error_samples_are_the_messages_given() -> None:
    """Each ``graddiag fit: error:`` line the README shows is one the test above checks."""
    shown = [line.split("graddiag fit: error: ", 1)[1]
             for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("graddiag fit: error: ")]
    assert len(shown) >= 2
    assert set(shown) <= {line for _, line in BAD_VALUES}
