"""The peers of the benchmark, in report order: ``key -> "module:Class"`` (imported lazily, so a
peer whose packages are missing does not stop the others)."""
from __future__ import annotations

import importlib

from .base import Peer, PeerUnavailable

PEERS: dict[str, str] = {
    "mp-fork": "bench.peers.floors:ForkPerTask",
    "mp-fork-fair": "bench.peers.floors:ForkPerTaskFair",
    "pool": "bench.peers.floors:PoolExecutor",
    "celery": "bench.peers.celery_peer:CeleryPeer",
    "rq": "bench.peers.rq_peer:RQPeer",
    "upstream": "bench.peers.upstream_peer:UpstreamPeer",
    "restful-functions": "bench.peers.restful_functions_peer:RestfulFunctionsPeer",
    "http-floor-dev": "bench.peers.mpc:DevServerFloor",
    "http-floor-dev-wait": "bench.peers.mpc:DevServerFloorWait",
    "http-floor-gunicorn": "bench.peers.mpc:GunicornFloor",
    "http-floor-gunicorn-wait": "bench.peers.mpc:GunicornFloorWait",
    "mpc-api-fresh": "bench.peers.mpc:ApiFresh",
    "mpc-api-reused": "bench.peers.mpc:ApiReused",
    "mpc-dev-fresh": "bench.peers.mpc:DevServerFresh",
    "mpc-dev-reused": "bench.peers.mpc:DevServerReused",
    "mpc-gunicorn-fresh": "bench.peers.mpc:GunicornFresh",
    "mpc-gunicorn-reused": "bench.peers.mpc:GunicornReused",
    "mpc-gunicorn-reused-redis": "bench.peers.mpc:GunicornReusedRedis",
    "mpc-gunicorn-reused-pg": "bench.peers.mpc:GunicornReusedPostgres",
    "mpc-dev-reused-wait": "bench.peers.mpc:DevServerReusedWait",
    "mpc-gunicorn-reused-wait": "bench.peers.mpc:GunicornReusedWait",
    "mpc-dev-batch": "bench.peers.mpc:DevServerBatch",
    "mpc-gunicorn-batch": "bench.peers.mpc:GunicornBatch",
}


def load(key: str) -> type[Peer]:
    """The peer class registered under ``key``."""
    module, _, name = PEERS[key].partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["PEERS", "load", "Peer", "PeerUnavailable"]
