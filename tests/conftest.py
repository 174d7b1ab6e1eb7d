from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.nn.modules import module as module_globals

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks",
                "_global_backward_pre_hooks", "_global_backward_hooks")


def _function_modes() -> list[object]:
    return list(torch.overrides._get_current_function_mode_stack())


def _left_behind(hooks_before: dict[str, set[int]]) -> list[str]:
    """What a test left in process-global state, cleaning it up so later tests start clean."""
    problems = []
    modes = _function_modes()
    if modes:
        problems.append(f"TorchFunctionMode(s) still active: {[type(m).__name__ for m in modes]}")
        for _ in modes:
            torch.overrides._pop_mode()
    for name in GLOBAL_HOOKS:
        hooks = getattr(module_globals, name)
        extra = set(hooks) - hooks_before[name]
        if extra:
            problems.append(f"{len(extra)} global module hook(s) left in torch.nn.modules.module.{name}")
            for key in extra:
                hooks.pop(key, None)
    if dist.is_available() and dist.is_initialized():
        problems.append("a torch.distributed default process group is still initialised")
        dist.destroy_process_group()
    return problems


@pytest.fixture(autouse=True)
def leaves_no_global_state() -> Iterator[None]:
    """Fail any test that leaves a function mode, a global module hook or a process group."""
    before = {name: set(getattr(module_globals, name)) for name in GLOBAL_HOOKS}
    yield
    problems = _left_behind(before)
    if problems:
        pytest.fail("test left global state behind: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from graddiag.demos.data import digits_tensors

    return digits_tensors()


@pytest.fixture(scope="session")
def plugin_logs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - tests.plugin_runs.PluginLogs
    """Logs of real runs for the graddiag tab (hostile run and layer names, a pathology)."""
    from tests.plugin_runs import write_plugin_logs

    return write_plugin_logs(tmp_path_factory.mktemp("plugin"))
