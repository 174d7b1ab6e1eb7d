"""Every bad option is rejected with a ValueError naming the option, what is allowed and the value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from graddiag import GradientDiagnostics, GradientMonitor, MonitorConfig


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("every_n_steps", 0, "integer >= 1"),
        ("every_n_steps", 2.5, "integer >= 1"),
        ("every_n_steps", True, "integer >= 1"),
        ("norm_type", 0, "p > 0 or 'inf'"),
        ("norm_type", "two", "p > 0 or 'inf'"),
        ("norm_type", math.nan, "p > 0 or 'inf'"),
        ("param_every_n_steps", -1, "integer >= 0"),
        ("activation_every_n_steps", -5, "integer >= 0"),
        ("vanishing_abs", -1e-3, "number >= 0.0"),
        ("vanishing_rel", 1.5, "number in [0.0, 1.0]"),
        ("exploding_abs", math.nan, "number >= 0.0"),
        ("exploding_factor", 1.0, "number > 1.0"),
        ("exploding_window", 0, "integer >= 1"),
        ("vanishing_patience", 0, "integer >= 1"),
        ("saturated_fraction", -0.1, "number in [0.0, 1.0]"),
        ("dead_fraction", 2, "number in [0.0, 1.0]"),
        ("derivative_floor", -1, "number >= 0.0"),
        ("vanishing_rel", np.bool_(True), "number in [0.0, 1.0]"),
        ("exploding_abs", True, "number >= 0.0"),
        ("norm_type", False, "p > 0 or 'inf'"),
        ("every_n_steps", np.float64(2.0), "integer >= 1"),
        ("ignore", ["vanishing", "vanish"], "finding kinds from"),
        ("exclude", [1], "list of strings"),
        ("on_nonfinite", "explode", "['warn', 'raise', 'stop', 'skip']"),
        ("on_exploding", None, "['warn', 'raise', 'stop', 'skip']"),
        ("ignore", ["sadness"], "finding kinds from"),
        ("include", 3, "list of strings"),
        ("functional_activations", "yes", "True or False"),
        ("functional_activations", 1, "True or False"),
        ("replay_nonfinite", "always", "True or False"),
        ("max_history_rows", 0, "integer >= 1"),
        ("histogram_every_n_steps", -2, "integer >= 0"),
        ("early_steps", -1, "integer >= 0"),
        ("early_steps", 2.0, "integer >= 0"),
        ("vanishing_early_rel", 2.0, "number in [0.0, 1.0]"),
        ("vanishing_early_patience", 0, "integer >= 1"),
        ("stalled_ratio", -1e-6, "number >= 0.0"),
        ("stalled_rel", math.nan, "number in [0.0, 1.0]"),
        ("unstable_ratio", 0.0, "number > 0.0"),
        ("unstable_ratio", "big", "number > 0.0"),
        ("update_patience", 0, "integer >= 1"),
    ],
)
def test_bad_option_names_option_allowed_and_given(option: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as error:
        MonitorConfig.from_options(**{option: value})
    text = str(error.value)
    assert text.startswith(option)
    assert allowed in text
    assert repr(value) in text or str(value) in text


@pytest.mark.parametrize("option", ["on_nonfinite", "every_n_steps", "vanishing_rel"])
def test_callback_and_monitor_check_options_at_construction(option: str) -> None:
    bad = {"on_nonfinite": "panic", "every_n_steps": -3, "vanishing_rel": 7.0}[option]
    with pytest.raises(ValueError, match=option):
        GradientDiagnostics(**{option: bad})
    with pytest.raises(ValueError, match=option):
        GradientMonitor(nn.Linear(2, 2), **{option: bad})


def test_unknown_option_is_an_error_listing_the_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['every_n_step'\]; allowed"):
        GradientMonitor(nn.Linear(2, 2), every_n_step=3)
    with pytest.raises(TypeError):
        GradientDiagnostics(every_n_step=3)  # type: ignore[call-arg]


def test_callback_bad_logging_options() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps must be an integer >= 1 or None, got 0"):
        GradientDiagnostics(log_every_n_steps=0)
    with pytest.raises(ValueError, match="prefix must be a string"):
        GradientDiagnostics(prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="figure_every_n_steps must be an integer >= 0 or None, got -1"):
        GradientDiagnostics(figure_every_n_steps=-1)
    with pytest.raises(ValueError, match="progress_bar must be True or False, got 'yes'"):
        GradientDiagnostics(progress_bar="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="print_summary must be True or False, got 1"):
        GradientDiagnostics(print_summary=1)  # type: ignore[arg-type]


def test_norm_type_accepts_inf_spellings() -> None:
    assert MonitorConfig(norm_type="inf").norm_type == math.inf
    assert MonitorConfig(norm_type=math.inf).norm_type == math.inf


def test_model_must_be_a_module() -> None:
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got list"):
        GradientMonitor([1, 2])  # type: ignore[arg-type]


def test_numpy_numbers_are_accepted_and_kept_as_python_numbers() -> None:
    config = MonitorConfig(every_n_steps=np.int64(3), param_every_n_steps=np.uint8(0),
                           vanishing_rel=np.float32(0.25), exploding_abs=np.int32(7),
                           norm_type=np.float64(1.5), functional_activations=np.bool_(False))
    assert (config.every_n_steps, config.param_every_n_steps) == (3, 0)
    assert (config.vanishing_rel, config.exploding_abs, config.norm_type) == (0.25, 7.0, 1.5)
    assert config.functional_activations is False
    for name in ("every_n_steps", "param_every_n_steps"):
        assert type(getattr(config, name)) is int
    for name in ("vanishing_rel", "exploding_abs", "norm_type"):
        assert type(getattr(config, name)) is float
    cb = GradientDiagnostics(every_n_steps=np.int64(2), log_every_n_steps=np.int16(5),
                             progress_bar=np.bool_(True))
    assert cb.config.every_n_steps == 2 and cb.log_every_n_steps == 5 and cb.progress_bar is True


class _NoReport:
    def close(self) -> None:
        pass


class _CloseNotCallable:
    close = "soon"

    def report(self, snapshot: object) -> None:
        pass


class _Full(_CloseNotCallable):
    def close(self) -> None:  # type: ignore[override]
        pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation_registry": "default"},
         (r"activation_registry must be None \(the built-in activations\) or an "
          r"ActivationRegistry, .*got 'default'")),
        ({"activation_registry": {}}, "activation_registry must be None"),
        ({"reporters": [_NoReport()]},
         r"reporters must be objects with report\(snapshot\).*; reporters\[0\] \(_NoReport\) "
         r"has a bad report \(missing\)"),
        ({"reporters": [_Full(), _CloseNotCallable()]},
         r"reporters\[1\] \(_CloseNotCallable\) has a bad close \(not callable\), got"),
        ({"reporters": [object()]}, r"reporters\[0\] \(object\) has a bad report"),
        ({"reporters": [_Full]}, r"reporters\[0\] is the class _Full \(pass an instance"),
        ({"reporters": _Full()}, "reporters must be None or a list of objects with report"),
    ],
)
def test_object_arguments_are_checked_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientDiagnostics(**kwargs)
    with pytest.raises(ValueError, match=message):
        GradientMonitor(nn.Linear(2, 2), **kwargs)


def test_a_reporter_without_close_or_finish_is_fine() -> None:
    class ReportOnly:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def report(self, snapshot: object) -> None:
            self.steps.append(snapshot.record.step)  # type: ignore[attr-defined]

    reporter = ReportOnly()
    model = nn.Linear(2, 2)
    with GradientMonitor(model, reporters=[reporter]) as monitor:
        for _ in range(3):
            model(torch.randn(4, 2)).sum().backward()
            monitor.step()
    assert reporter.steps == [0, 1, 2]
    GradientDiagnostics(reporters=[reporter])  # accepted at construction too


@pytest.mark.parametrize(("include", "exclude"), [([], ()), (None, ["*"]), (["0"], ["0"])])
def test_patterns_that_leave_no_layer_say_so(include: list[str] | None, exclude: list[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ValueError) as error:
        GradientMonitor(model, include=include, exclude=exclude, reporters=[])
    text = str(error.value)
    assert "left no layer to monitor; layers are ['0', '2']" in text
    assert f"include={include!r}" in text and f"exclude={list(exclude)!r}" in text
    assert "trainable parameters" not in caplog.text
