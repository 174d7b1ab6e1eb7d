"""Early confirmation: a condition reported before its full patience when the evidence is overwhelming."""

from __future__ import annotations

from typing import Any

import numpy as np

from graddiag.rules.onsets import Onsets


class EarlyConfirmation:
    """Confirms keys of a main :class:`Onsets` after a shorter patience on a stricter condition.

    The stricter condition must imply the main one (it is a subset of it on every step), so a
    condition reported early stays reported as long as the main condition's report stands (it
    holds, or has been gone for fewer steps than the main patience), and is never reported
    twice: the main tracker's ``reported`` set is the one record of what was said.
    """

    def __init__(self, patience: int) -> None:
        self.onsets = Onsets(patience)

    def confirm(self, main: Onsets, keys: list[str], overwhelming: np.ndarray,
                evaluated: np.ndarray | None = None) -> list[int]:
        """Positions whose overwhelming condition has held for the short patience, not yet reported."""
        positions = self.onsets.observe_all(keys, overwhelming, evaluated).tolist()
        if not positions:
            return []
        said = main.reported
        fresh = [int(i) for i in positions if keys[i] not in said]
        for i in fresh:
            main.mark_reported(keys[i])
        return fresh

    def any_confirmed(self) -> bool:
        return self.onsets.any_confirmed()

    def state_dict(self) -> dict[str, Any]:
        return self.onsets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.onsets.load_state_dict(state)
