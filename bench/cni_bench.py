"""``make bench SECTIONS=cni``: a container's network through netagent's CNI plugin,
beside Debian's reference plugins and netavark (``bench/cni_reference.py``), and at scale.

The issue's targets: netagent's ADD p50 <= 0.5x the reference plugins', DEL p50 <= 0.5x;
ADD with 1,000 containers attached <= 1.2x ADD with 10. Process start included.
"""

from __future__ import annotations

from typing import Any

from cni_reference import cni_reference, cni_scale


def cni(n: int = 50) -> dict[str, Any]:
    return {"side_by_side": cni_reference(n), "scale": cni_scale()}
