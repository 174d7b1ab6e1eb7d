"""The two Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch``.

They ship the same classes twice; a Trainer from one namespace accepts only callbacks and
recognises only loggers of its own. graddiag's callback derives from the ``Callback`` of every
namespace that is installed, and recognises the ``TensorBoardLogger`` of each.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def _installed() -> list[ModuleType]:
    modules = []
    for name in NAMESPACES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    if not modules:
        raise ImportError("graddiag's Lightning callback needs pytorch_lightning or lightning: "
                          "pip install pytorch-lightning (or lightning)")
    return modules


LIGHTNING_MODULES: tuple[ModuleType, ...] = tuple(_installed())
CALLBACK_BASES: tuple[type, ...] = tuple(m.Callback for m in LIGHTNING_MODULES)
TENSORBOARD_LOGGERS: tuple[type, ...] = tuple(
    importlib.import_module(f"{m.__name__}.loggers").TensorBoardLogger for m in LIGHTNING_MODULES
)
RICH_PROGRESS_BARS: tuple[type, ...] = tuple(
    importlib.import_module(f"{m.__name__}.callbacks").RichProgressBar for m in LIGHTNING_MODULES
)
rank_zero_info = importlib.import_module(
    f"{LIGHTNING_MODULES[0].__name__}.utilities"
).rank_zero_info
