"""The peers of the benchmark, in report order: ``key -> "module:Class"`` (imported lazily, so a
peer whose packages are missing does not stop the others)."""
from __future__ import annotations

import importlib

from .base import Peer, PeerUnavailable

PEERS: dict[str, str] = {
    "mp-fork": "bench.peers.floors:ForkPerTask",
    "pool": "bench.peers.floors:PoolExecutor",
    "celery": "bench.peers.celery_peer:CeleryPeer",
    "rq": "bench.peers.rq_peer:RQPeer",
    "upstream": "bench.peers.upstream_peer:UpstreamPeer",
    "restful-functions": "bench.peers.restful_functions_peer:RestfulFunctionsPeer",
    "mpc-api-fresh": "bench.peers.mpc:ApiFresh",
    "mpc-api-reused": "bench.peers.mpc:ApiReused",
    "mpc-dev-fresh": "bench.peers.mpc:DevServerFresh",
    "mpc-dev-reused": "bench.peers.mpc:DevServerReused",
    "mpc-gunicorn-fresh": "bench.peers.mpc:GunicornFresh",
    "mpc-gunicorn-reused": "bench.peers.mpc:GunicornReused",
}


def load(key: str) -> type[Peer]:
    """The peer class registered under ``key``."""
    module, _, name = PEERS[key].partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["PEERS", "load", "Peer", "PeerUnavailable"]
