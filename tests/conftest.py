from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from graddiag.demos.data import digits_tensors

    return digits_tensors()


@pytest.fixture(scope="session")
def plugin_logs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - tests.plugin_runs.PluginLogs
    """Logs of real runs for the graddiag tab (hostile run and layer names, a pathology)."""
    from tests.plugin_runs import write_plugin_logs

    return write_plugin_logs(tmp_path_factory.mktemp("plugin"))
