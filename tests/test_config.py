"""Every bad option is rejected with a ValueError naming the option, what is allowed and the value."""

from __future__ import annotations

import inspect
import math

import pytest
from torch import nn

from graddiag import GradientDiagnostics, GradientMonitor, MonitorConfig
from graddiag.data.options import OPTION_NAMES


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
        ("vanishing_abs", -1e-3, "number in [0.0"),
        ("vanishing_rel", 1.5, "number in [0.0, 1.0]"),
        ("exploding_abs", math.nan, "number in [0.0"),
        ("exploding_factor", 1.0, "number in (1.0"),
        ("exploding_window", 0, "integer >= 1"),
        ("vanishing_patience", 0, "integer >= 1"),
        ("saturated_fraction", -0.1, "number in [0.0, 1.0]"),
        ("dead_fraction", 2, "number in [0.0, 1.0]"),
        ("derivative_floor", -1, "number in [0.0"),
        ("on_nonfinite", "explode", "['warn', 'raise', 'stop', 'skip']"),
        ("on_exploding", None, "['warn', 'raise', 'stop', 'skip']"),
        ("ignore", ["sadness"], "finding kinds from"),
        ("include", 3, "list of strings"),
        ("functional_activations", "yes", "True or False"),
        ("replay_nonfinite", "always", "True or False"),
        ("max_history_rows", 0, "integer >= 1"),
        ("histogram_every_n_steps", -2, "integer >= 0"),
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
    with pytest.raises(ValueError, match="log_every_n_steps must be an integer >= 1, got 0"):
        GradientDiagnostics(log_every_n_steps=0)
    with pytest.raises(ValueError, match="prefix must be a string"):
        GradientDiagnostics(prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="figure_every_n_steps must be an integer >= 0, got -1"):
        GradientDiagnostics(figure_every_n_steps=-1)
    with pytest.raises(ValueError, match="progress_bar must be True or False, got 'yes'"):
        GradientDiagnostics(progress_bar="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="print_summary must be True or False, got 1"):
        GradientDiagnostics(print_summary=1)  # type: ignore[arg-type]


def test_norm_type_accepts_inf_spellings() -> None:
    assert MonitorConfig(norm_type="inf").norm_type == math.inf
    assert MonitorConfig(norm_type=math.inf).norm_type == math.inf


def test_callback_offers_every_monitor_option_with_the_same_default() -> None:
    params = inspect.signature(GradientDiagnostics.__init__).parameters
    defaults = MonitorConfig()
    for name in OPTION_NAMES:
        assert name in params, name
        default = params[name].default
        expected = getattr(defaults, name)
        if isinstance(expected, tuple):
            assert default in (None, list(expected)), name
        else:
            assert default == expected, name


def test_model_must_be_a_module() -> None:
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got list"):
        GradientMonitor([1, 2])  # type: ignore[arg-type]
