"""``graddiag fit``: YAML-driven experiments on LightningCLI (jsonargparse).

Model and data are given by ``class_path``/``init_args`` (any LightningModule and
LightningDataModule); the ``diagnostics:`` section configures the :class:`GradientDiagnostics`
callback that every run gets, type-checked and documented in ``graddiag fit --help``.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any, NoReturn

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from graddiag.data.errors import PatternMatchError
from graddiag.data.options import OPTIONS, get_option, split_options
from graddiag.lightning.callback import GradientDiagnostics
from graddiag.measure.layers import discover_layers

EXIT_USAGE = 2
_PARSER_KEY = re.compile(r'Parser key "diagnostics\.(\w+)"')
_GIVEN = re.compile(r"(?:Got|Given) value: (.*)")


def _usage_error(line: str) -> NoReturn:
    """One line on stderr, exit status 2: how ``graddiag fit`` rejects a bad option."""
    sys.stderr.write(f"graddiag fit: error: {line}\n")
    raise SystemExit(EXIT_USAGE)


class DiagnosticsParser(LightningArgumentParser):
    """Rejects a ``diagnostics.*`` value of the wrong type in one line: option, allowed, given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # "--diagnostics.every_n_step 3" must not be taken for every_n_steps
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        key = _PARSER_KEY.search(message)
        if key and self.exit_on_error and key.group(1) in {o.name for o in OPTIONS}:
            found = _GIVEN.findall(message)
            given = found[-1].strip() if found else " ".join(message.split()[3:])
            _usage_error(f"--diagnostics.{key.group(1)} must be "
                         f"{get_option(key.group(1)).allowed}, got {given}")
        super().error(message, ex)


class GraddiagCLI(LightningCLI):
    """LightningCLI with a ``diagnostics`` section for :class:`GradientDiagnostics`.

    Every diagnostics option is checked before anything is built: a wrong type (by
    jsonargparse) or an out-of-range value (by the option's own check) ends the command with
    one line naming the option, what is allowed and what was given, and exit status 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", DiagnosticsParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(GradientDiagnostics, "diagnostics")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._check_diagnostics()

    def before_fit(self) -> None:
        """Check the ``include``/``exclude`` patterns against the model now, before fit starts
        and a logger makes its version directory (a :class:`PatternMatchError` ends the
        command with one line)."""
        config = diagnostics_of(self).config
        if config.include is not None or config.exclude:
            try:
                discover_layers(self.model, config.include, config.exclude)
            except PatternMatchError as error:
                _usage_error(f"--diagnostics.{error}")

    def _check_diagnostics(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        trainer = config.get("trainer") or {}
        callbacks = trainer.get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            path = callback.get("class_path")  # jsonargparse gives every entry its full path
            if isinstance(path, str) and _is_diagnostics(path):
                _usage_error(f"trainer.callbacks lists {path}: graddiag fit adds the one "
                             "GradientDiagnostics itself; configure it in the diagnostics: "
                             "section instead")
        section = config.get("diagnostics")
        if section is None:
            return
        values = {o.name: section[o.name] for o in OPTIONS if o.name in section}
        try:
            split_options(values)
        except ValueError as error:
            _usage_error(f"--diagnostics.{error}")


def _is_diagnostics(class_path: str) -> bool:
    """Whether ``class_path`` names GradientDiagnostics or a subclass of it (``False`` when it
    does not import: LightningCLI says so itself)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, GradientDiagnostics)


def run_cli(args: list[str], **kwargs: Any) -> GraddiagCLI:
    """Run ``graddiag fit``-style arguments in process; returns the CLI (trainer, model, ...)."""
    return GraddiagCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )


def diagnostics_of(cli: LightningCLI) -> GradientDiagnostics:
    """The GradientDiagnostics callback of a finished CLI run."""
    for callback in cli.trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, GradientDiagnostics):
            return callback
    raise LookupError("no GradientDiagnostics callback in this run")
