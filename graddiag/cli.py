"""The ``graddiag`` command: ``report`` (read logs), ``fit`` (YAML experiments), ``study``, ``demo``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from graddiag.data.findings import FINDING_KINDS

EXIT_OK, EXIT_ALARM, EXIT_USAGE = 0, 1, 2


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if kinds == ["any"]:
        return list(FINDING_KINDS)
    unknown = [k for k in kinds if k not in FINDING_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"--fail-on takes a comma-separated list of {list(FINDING_KINDS)} or 'any', "
            f"got {text!r}"
        )
    return kinds


def report(argv: list[str]) -> int:
    """``graddiag report LOGDIR [--csv PATH] [--fail-on KINDS]``."""
    import pandas as pd

    from graddiag.reporters.logs import layer_summary, read_logs

    parser = argparse.ArgumentParser(
        prog="graddiag report",
        description="Summarise graddiag's TensorBoard logs: per-layer gradient norms and findings.",
    )
    parser.add_argument("logdir", type=Path, help="a TensorBoard log directory (searched recursively)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="write every graddiag scalar (long format) to this CSV file")
    parser.add_argument("--fail-on", type=_kinds, default=[], metavar="KINDS",
                        help="exit with status 1 if findings of these kinds were logged "
                             "(comma-separated, or 'any')")
    parser.add_argument("--prefix", default="graddiag/", help="tag prefix used when logging")
    args = parser.parse_args(argv)
    try:
        data = read_logs(args.logdir, prefix=args.prefix)
    except (FileNotFoundError, ValueError) as error:
        print(f"graddiag report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for problem in data.problems:
        print(f"graddiag report: warning: {problem}", file=sys.stderr)
    if args.csv is not None:  # written first: a reader closing the pipe early still gets it
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            data.scalars.to_csv(args.csv, index=False)
        except OSError as error:
            print(f"graddiag report: error: cannot write --csv {str(args.csv)!r}: "
                  f"{error.strerror or error}", file=sys.stderr)
            return EXIT_USAGE
    alarms = data.findings[data.findings.kind.isin(args.fail_on or [])]
    try:
        with pd.option_context("display.width", 160, "display.max_columns", 20,
                               "display.max_rows", 500, "display.float_format", "{:.3g}".format):
            summary = layer_summary(data.scalars)
            print("Per-layer gradient norms:")
            print(summary.to_string(index=False) if len(summary)
                  else "  (no gradient norms logged)")
            print("\nFindings:")
            columns = ["run", "kind", "layer", "step", "value"]
            print(data.findings[columns].to_string(index=False) if len(data.findings)
                  else "  none")
        if args.csv is not None:
            print(f"\nWrote {len(data.scalars)} rows to {args.csv}")
        sys.stdout.flush()
    except BrokenPipeError:  # `graddiag report ... | head`: the reader has what it wanted
        _silence_stdout()
    if len(alarms):
        print(f"\n{len(alarms)} finding(s) of kinds {sorted(set(alarms.kind))}: failing.",
              file=sys.stderr)
        return EXIT_ALARM
    return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's final flush to a closed pipe
    raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stream without a file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"report": report, "fit": _fit, "options": _options, "study": _study,
                "demo": _demo}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: graddiag {report,fit,options,study,demo} ...\n\n"
              "  report LOGDIR   summarise TensorBoard logs; --fail-on KINDS gates CI\n"
              "  fit --config X  run a YAML experiment (LightningCLI)\n"
              "  options         every option: default, allowed values, meaning (Markdown)\n"
              "  study           the activation/depth study on the digits data\n"
              "  demo            the deep sigmoid vs ReLU demonstration",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    return commands[argv[0]](argv[1:])


def _fit(argv: list[str]) -> int:
    import warnings

    from graddiag.lightning.fit import run_cli

    with warnings.catch_warnings():  # the arguments are sys.argv's own: nothing to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        run_cli(["fit", *argv])
    return EXIT_OK


def _options(argv: list[str]) -> int:
    """``graddiag options``: the options table, as in the README (generated, never edited)."""
    from graddiag.data.option_docs import markdown_table

    argparse.ArgumentParser(
        prog="graddiag options",
        description="Print every option of GradientMonitor and GradientDiagnostics as the "
                    "README's Markdown table.",
    ).parse_args(argv)
    print(markdown_table(), end="")
    return EXIT_OK


def _study(argv: list[str]) -> int:
    from graddiag.demos.study import main as study_main

    return study_main(argv)


def _demo(argv: list[str]) -> int:
    from graddiag.demos.run import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
