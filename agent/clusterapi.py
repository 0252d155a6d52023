"""What the API answers about the cluster: ``ctl peers``, the ``cluster`` part of
``status``, and the hosts for a picture of the topology.

Kept out of ``api.py`` so the cluster is one room the API asks; a daemon started
without ``--cluster-endpoints`` has no cluster and says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import NotFound
from .keystatus import IN_PLACE
from .reconcile import FIREWALL

if TYPE_CHECKING:
    from .cluster import Cluster
    from .reconcile import Reconciler

NOT_IN_A_CLUSTER = (
    "this daemon is not in a cluster: run it with --cluster-endpoints (docs/cluster.md)"
)


def state_of(rec: Reconciler) -> Any:
    """A key's reconcile state as ``show`` says it: a kind the firewall realizes (peers:
    the VXLAN port's guard) is in place only while the firewall is."""

    def of(key: str) -> str | None:
        st = rec.status.get(key)
        if st is None:
            return None
        fw = rec.status.get(FIREWALL)
        if st.state == IN_PLACE and (fw is None or fw.state != IN_PLACE):
            return fw.state if fw is not None else "pending"
        return st.state

    return of


def peers(cluster: Cluster | None) -> list[dict[str, Any]]:
    if cluster is None:
        raise NotFound(NOT_IN_A_CLUSTER)
    return cluster.peers()


def status(cluster: Cluster | None) -> dict[str, Any] | None:
    return None if cluster is None else cluster.status()
