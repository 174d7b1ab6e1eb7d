"""TensorBoard output read back and asserted, the report command, and a real TensorBoard server."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea

from graddiag import GradientDiagnostics
from graddiag.cli import main as cli_main
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP
from graddiag.reporters.logs import read_logs
from graddiag.reporters.tensorboard import FIGURE_FILE
from tests.helpers import quiet_trainer


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GradientDiagnostics, Path]:
    root = tmp_path_factory.mktemp("tb")
    cb = GradientDiagnostics(activation_every_n_steps=4, histogram_every_n_steps=8,
                             figure_every_n_steps=10, param_every_n_steps=4)
    logger = TensorBoardLogger(str(root), name="sigmoid")
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=24, callbacks=[cb], logger=logger, log_every_n_steps=4)
    trainer.fit(DeepMLP(depth=10, width=32, activation="sigmoid", optimizer="sgd", lr=0.1),
                DigitsDataModule(batch_size=32))
    return root, cb, Path(logger.log_dir)


def test_scalars_equal_history(sigmoid_run) -> None:  # noqa: ANN001
    root, cb, _ = sigmoid_run
    data = read_logs(root)
    grad = data.scalars[data.scalars.statistic == "grad_norm"]
    assert sorted(grad.step.unique()) == [0, 4, 8, 12, 16, 20]
    merged = grad.merge(cb.history, on=["step", "layer"], suffixes=("_tb", "_hist"))
    assert len(merged) == 6 * 11
    assert (merged.value - merged.grad_norm).abs().max() <= 1e-6 * merged.grad_norm.abs().max()
    stats = set(data.scalars.statistic)
    assert {"grad_norm", "param_norm", "update_ratio", "saturated", "gain", "global_grad_norm",
            "active_findings", "layer_norm"} <= stats
    active = data.scalars[data.scalars.statistic == "active_findings"].value
    assert active.iloc[-1] >= 1


def test_dashboard_text_image_histograms_and_png(sigmoid_run) -> None:  # noqa: ANN001
    _, cb, logdir = sigmoid_run
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0, ea.IMAGES: 0,
                                                          ea.HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()
    assert "custom_scalars__config__" in tags["tensors"]
    layout = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    from tensorboard.plugins.custom_scalar import layout_pb2

    parsed = layout_pb2.Layout()
    parsed.ParseFromString(layout)
    titles = {chart.title for cat in parsed.category for chart in cat.chart}
    assert {"gradient norm per layer", "saturated fraction (sigmoid/tanh)",
            "layer gradient norms: median with min-max margin"} <= titles
    images = acc.Images("graddiag/gradient_flow")
    assert [e.step for e in images] == [10, 20, 23]  # per interval, then the whole run at the end
    findings = acc.Tensors("graddiag/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    for i, f in enumerate(cb.findings, 1):
        assert f"| {i} | {f.kind} | `{f.layer}` | {f.step} |" in findings
        assert f"#### {i}. {f.kind}: `{f.layer}`, step {f.step}" in findings
    summary = acc.Tensors("graddiag/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| `net.0` |" in summary
    hist = acc.Histograms("graddiag/grad_hist/net.0")
    assert [h.step for h in hist] == [0, 8, 16]
    assert hist[0].histogram_value.num == 32 * 64 + 32  # every gradient element of net.0
    assert (logdir / FIGURE_FILE).stat().st_size > 10_000


def test_report_command_on_real_logs(sigmoid_run, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    root, cb, _ = sigmoid_run
    out = tmp_path / "scalars.csv"
    assert cli_main(["report", str(root), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "net.0" in printed and "vanishing" in printed
    table = pd.read_csv(out)
    assert {"run", "tag", "statistic", "layer", "step", "value"} <= set(table.columns)
    assert cli_main(["report", str(root), "--fail-on", "vanishing"]) == 1
    assert cli_main(["report", str(root), "--fail-on", "nonfinite,exploding"]) == 0


def test_report_rejects_missing_and_empty_dirs(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["report", str(tmp_path), "--fail-on", "sadness"])


def test_other_loggers_get_scalars_and_one_warning(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    cb = GradientDiagnostics(activation_every_n_steps=0)
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO, logger="graddiag"):
        quiet_trainer(max_steps=3, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(
            DeepMLP(depth=1, width=8), DigitsDataModule(batch_size=16))
    notices = [r for r in caplog.records if "need a TensorBoardLogger" in r.getMessage()]
    assert len(notices) == 1 and "CSVLogger" in notices[0].getMessage()
    assert notices[0].levelno == logging.WARNING  # a user must see it
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert "graddiag/grad_norm/net.0" in metrics.columns


def test_save_history_csv_and_parquet(sigmoid_run, tmp_path: Path) -> None:  # noqa: ANN001
    _, cb, _ = sigmoid_run
    cb.save_history(tmp_path / "h.csv")
    cb.save_history(tmp_path / "h.parquet")
    assert len(pd.read_csv(tmp_path / "h.csv")) == len(cb.history)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "h.parquet"), cb.history)
    with pytest.raises(ValueError, match="must end in .csv or .parquet, got"):
        cb.save_history(tmp_path / "h.xlsx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **params: str) -> bytes:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{query}", timeout=10) as r:
        return r.read()


def test_a_real_tensorboard_serves_the_dashboard(sigmoid_run) -> None:  # noqa: ANN001
    root, cb, logdir = sigmoid_run
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        run = str(logdir.relative_to(root))
        tags: dict = {}
        while time.monotonic() < deadline:
            try:
                tags = json.loads(_get(port, "/data/plugin/scalars/tags"))
                if run in tags and "graddiag/grad_norm/net.0" in tags[run]:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert "graddiag/grad_norm/net.0" in tags[run]
        series = json.loads(_get(port, "/data/plugin/scalars/scalars", run=run,
                                 tag="graddiag/grad_norm/net.0"))
        h = cb.history
        expected = h[h.layer == "net.0"].set_index("step").grad_norm
        assert [s[1] for s in series] == [0, 4, 8, 12, 16, 20]
        for _, step, value in series:
            assert value == pytest.approx(expected[step], rel=1e-6)
        layout = json.loads(_get(port, "/data/plugin/custom_scalars/layout"))
        titles = {c["title"] for cat in layout["category"] for c in cat["chart"]}
        assert "gradient norm per layer" in titles
        text_tags = json.loads(_get(port, "/data/plugin/text/tags"))
        assert "graddiag/findings/text_summary" in text_tags[run]
        text = json.loads(_get(port, "/data/plugin/text/text", run=run,
                               tag="graddiag/findings/text_summary"))
        assert "vanishing" in text[-1]["text"]
        image_tags = json.loads(_get(port, "/data/plugin/images/tags"))
        assert "graddiag/gradient_flow" in image_tags[run]
    finally:
        server.terminate()
        server.wait(timeout=10)


class _WriterSeconds:
    """A wall clock that moves a second when told: event file names start with the second their
    writer was made in, then a per-process writer counter, and TensorBoard reads a run's files
    in name order (two writers made in one real second can sort against their order of
    creation, 10 before 9); each writer made after :meth:`next` is named a second later."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = float(int(time.time()))
        monkeypatch.setattr(time, "time", lambda: self.now)

    def next(self) -> None:
        self.now += 1.0


def _two_writes(logdir: Path, clock: _WriterSeconds) -> None:
    """A run that crashed after step 5 and was resumed from step 3 into the same directory: two
    event files, steps 3-5 written by both (1.0 first, then 2.0)."""
    from torch.utils.tensorboard import SummaryWriter

    for suffix, steps, value in ((".first", range(0, 6), 1.0), (".resumed", range(3, 8), 2.0)):
        writer = SummaryWriter(str(logdir), filename_suffix=suffix)
        for step in steps:
            writer.add_scalar("graddiag/grad_norm/net.0", value, step)
        writer.close()
        clock.next()


def test_report_keeps_the_value_written_last_for_a_step_written_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _two_writes(tmp_path, _WriterSeconds(monkeypatch))
    scalars = read_logs(tmp_path).scalars
    assert scalars.step.tolist() == list(range(8))  # one row per step, in step order
    assert scalars.value.tolist() == [1.0] * 3 + [2.0] * 5


def test_a_run_started_again_in_the_same_directory_replaces_the_abandoned_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A wrote steps 0-9, run B (not a resume) 0-4: A's steps 5-9 are orphans of the
    abandoned run, not the continuation of B."""
    from torch.utils.tensorboard import SummaryWriter

    clock = _WriterSeconds(monkeypatch)
    for suffix, steps, value in ((".a", range(10), 1.0), (".b", range(5), 2.0)):
        writer = SummaryWriter(str(tmp_path), filename_suffix=suffix)
        for step in steps:
            writer.add_scalar("graddiag/grad_norm/net.0", value, step)
        writer.close()
        clock.next()
    scalars = read_logs(tmp_path).scalars
    assert scalars.step.tolist() == list(range(5)) and set(scalars.value) == {2.0}


@pytest.mark.slow  # a fresh interpreter
def test_report_into_a_closed_pipe_writes_its_csv_and_no_traceback(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs"))  # a summary longer than a pipe's buffer
    for layer in range(3000):
        writer.add_scalar(f"graddiag/grad_norm/encoder.layers.{layer}.linear", 0.5, 0)
    writer.close()
    out = tmp_path / "all.csv"
    graddiag = Path(sys.executable).parent / "graddiag"
    result = subprocess.run(f"'{graddiag}' report '{tmp_path / 'logs'}' --csv '{out}' | head -1",
                            shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "Per-layer gradient norms:"
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert len(pd.read_csv(out)) == 3000
