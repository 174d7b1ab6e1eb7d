"""The ``tensorboard_plugins`` entry point as pyproject.toml declares it, visible to TensorBoard.

An editable install made before the entry point existed has no record of it; then a throw-away
``.dist-info`` holding exactly pyproject.toml's declaration is put on the path, so TensorBoard's
own entry-point discovery (not a plugin list handed to it) is what the tests exercise.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
GROUP = "tensorboard_plugins"


def declared_entry_points() -> dict[str, str]:
    """``{name: "module:attribute"}`` of the group in pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return dict(project.get("entry-points", {}).get(GROUP, {}))


def installed_entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=GROUP)}


def entry_point_path(tmp: Path) -> list[str]:
    """Extra ``sys.path`` entries needed for TensorBoard to find pyproject.toml's entry points."""
    declared = declared_entry_points()
    installed = installed_entry_points()
    if all(installed.get(name) == value for name, value in declared.items()):
        return []
    info = tmp / "graddiag_entry_points-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: graddiag-entry-points\n"
                                   "Version: 0\n")
    lines = [f"[{GROUP}]"] + [f"{name} = {value}" for name, value in declared.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return [str(tmp)]
