"""One options source: the callback signature, MonitorConfig, docs, README table and state_key
all follow from graddiag.data.options."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from graddiag import GradientDiagnostics, MonitorConfig
from graddiag.cli import main as cli_main
from graddiag.data.checks import Choice
from graddiag.data.option_docs import markdown_table
from graddiag.data.options import (
    ADAPTER_OPTION_NAMES,
    IDENTITY_OPTION_NAMES,
    OPTION_NAMES,
    OPTIONS,
    AdapterConfig,
    Option,
)

ROOT = Path(__file__).resolve().parents[1]


def test_callback_signature_is_exactly_the_options_then_the_object_arguments() -> None:
    params = list(inspect.signature(GradientDiagnostics).parameters.values())
    assert [p.name for p in params] == [o.name for o in OPTIONS] + ["activation_registry",
                                                                     "reporters"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    hints = typing.get_type_hints(GradientDiagnostics.__init__)
    for option, param in zip(OPTIONS, params):
        assert param.default == option.default, option.name
        assert param.annotation == option.type == hints[option.name], option.name
    assert params[-1].default is None and params[-2].default is None


def test_settings_dataclasses_hold_the_options_with_their_defaults() -> None:
    monitor = {f.name: f.default for f in dataclasses.fields(MonitorConfig)}
    adapter = {f.name: f.default for f in dataclasses.fields(AdapterConfig)}
    assert tuple(monitor) == OPTION_NAMES and tuple(adapter) == ADAPTER_OPTION_NAMES
    assert ADAPTER_OPTION_NAMES == ("log_every_n_steps", "figure_every_n_steps", "prefix",
                                    "progress_bar", "print_summary")
    assert {**monitor, **adapter} == {o.name: o.default for o in OPTIONS}
    assert [o.name for o in OPTIONS if o.adapter] == list(ADAPTER_OPTION_NAMES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MonitorConfig().every_n_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_default_passes_its_own_check_and_every_option_is_documented(option: Option) -> None:
    assert option.check(option.name, option.default) == (
        tuple(option.default) if isinstance(option.default, tuple) else option.default)
    assert option.doc and "\n" not in option.doc and option.doc.endswith(".")
    assert option.allowed
    doc = " ".join((GradientDiagnostics.__doc__ or "").split())
    assert f"{option.name}: {option.doc}" in doc
    if not option.adapter:
        assert f"{option.name}: {option.doc}" in " ".join((MonitorConfig.__doc__ or "").split())


def test_choices_are_literal_types_so_the_cli_rejects_bad_values() -> None:
    choices = [o for o in OPTIONS if isinstance(o.check, Choice)]
    assert {o.name for o in choices} == {"on_nonfinite", "on_exploding"}
    for option in choices:
        assert typing.get_origin(option.type) is typing.Literal
        assert typing.get_args(option.type) == option.check.values
    ignore = next(o for o in OPTIONS if o.name == "ignore")
    many, one = typing.get_args(ignore.type)  # a list of kinds, or one kind
    (kind,) = typing.get_args(many)
    assert typing.get_origin(many) is Sequence and kind == one
    assert typing.get_origin(kind) is typing.Literal
    assert set(typing.get_args(kind)) == {"vanishing", "exploding", "nonfinite", "no_gradient",
                                          "saturated", "dead_relu", "stalled", "unstable_update",
                                          "not_in_optimizer"}


def test_unknown_names_are_an_error_naming_them() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['vanishing_ratio'\]"):
        GradientDiagnostics(vanishing_ratio=0.1)
    with pytest.raises(TypeError):
        GradientDiagnostics(1)  # type: ignore[misc]  # keyword-only


def test_readme_options_table_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- options: begin.*?-->\n(.*?)<!-- options: end -->", readme, re.DOTALL)
    assert match, "README must hold the generated options table between the markers"
    assert match.group(1) == markdown_table()
    assert cli_main(["options"]) == 0
    assert capsys.readouterr().out == markdown_table()
    for option in OPTIONS:
        assert f"| `{option.name}` |" in match.group(1)


# --------------------------------------------------------------------------- state_key
def test_state_key_comes_from_identity_settings_only() -> None:
    assert IDENTITY_OPTION_NAMES == ("norm_type", "include", "exclude", "prefix")
    base = GradientDiagnostics().state_key
    assert len(base) < 120
    same = [{"vanishing_rel": 1e-3, "vanishing_patience": 3, "every_n_steps": 5,
             "on_nonfinite": "skip", "activation_every_n_steps": 0, "max_history_rows": 10,
             "log_every_n_steps": 7, "figure_every_n_steps": 0, "progress_bar": False,
             "print_summary": False, "ignore": ["dead_relu"]},
            {"norm_type": np.float64(2)}, {"norm_type": 2}, {"exclude": ()}]
    for options in same:
        assert GradientDiagnostics(**options).state_key == base, options
    different = [{"norm_type": 1}, {"norm_type": "inf"}, {"include": ["net.*"]},
                 {"exclude": ["net.0"]}, {"prefix": "other/"}]
    keys = {GradientDiagnostics(**options).state_key for options in different}
    assert len(keys) == len(different) and base not in keys
    assert (GradientDiagnostics(norm_type="inf").state_key
            == GradientDiagnostics(norm_type=math.inf).state_key)
    assert (GradientDiagnostics(include=("a", "b")).state_key
            == GradientDiagnostics(include=["a", "b"]).state_key)


def test_readme_package_layout_is_the_generated_one() -> None:
    """The README's one line per file is what ``benchmarks/layout.py`` prints from the package's
    own docstrings (a new file, or a changed first sentence, shows up here)."""
    import subprocess
    import sys

    generated = subprocess.run([sys.executable, "benchmarks/layout.py"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    assert "graddiag/pipeline/monitor.py" in generated
    assert generated.strip() in (ROOT / "README.md").read_text()
