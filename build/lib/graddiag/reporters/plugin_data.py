"""Machine-readable records for the graddiag tab in TensorBoard.

The reporter writes two JSON texts next to its scalars so that the tab does not have to guess:
``{prefix}layers_json`` (the layers in forward order and where the activation sites sit among
them, written when either changes) and ``{prefix}findings_json`` (every finding so far, written
whenever a finding begins). Both carry ``"schema": SCHEMA_VERSION``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from graddiag.data.findings import Finding

SCHEMA_VERSION = 1
LAYERS_TAG = "layers_json"
FINDINGS_TAG = "findings_json"


def json_number(value: float) -> float | str:
    """A float that JSON can carry: finite values as they are, others as ``"nan"``/``"inf"``."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def findings_json(findings: Sequence[Finding]) -> str:
    """All findings, oldest first: kind, layer, step, value, threshold, message, remedy."""
    rows = [
        {"kind": f.kind, "layer": f.layer, "step": int(f.step), "value": json_number(f.value),
         "threshold": json_number(f.threshold), "message": f.message, "remedy": f.remedy}
        for f in findings
    ]
    return json.dumps({"schema": SCHEMA_VERSION, "findings": rows}, allow_nan=False)


def layers_json(
    prefix: str,
    layers: Sequence[str],
    sites: Sequence[tuple[float, str, str, str]] = (),
) -> str:
    """The layer order and the activation sites among the layers.

    Args:
        prefix: The tag prefix the scalars were written under (``"graddiag/"``).
        layers: Layer names in forward order (input side first).
        sites: ``(x, site, kind, family)``: a site between layers ``k-1`` and ``k`` has
            ``x = k - 0.5``; ``family`` is ``"saturating"`` (its fraction is logged under
            ``{prefix}saturated/{site}``) or ``"rectifier"`` (``{prefix}dead/{site}``).
    """
    data: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "prefix": prefix,
        "layers": list(layers),
        "sites": [{"x": json_number(x), "site": site, "kind": kind, "family": family}
                  for x, site, kind, family in sites],
    }
    return json.dumps(data, allow_nan=False)
