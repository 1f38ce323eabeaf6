"""The benchmark tasks served by restful-functions 2.x, the way its README serves functions.

One ``FunctionServer`` (aiohttp) on 127.0.0.1 with every task added by ``add_function`` with
``max_concurrency=2``; each call forks a process. Its task store is SQLite, as by default, but in
the peer's work directory instead of the shared ``<tmp>/restful-functions.db``.

    python -m bench.peers.restful_functions_app --port P --db FILE

Function names are the Python functions' own names: ``/terminate/function/{name}`` finds the
processes to stop by ``func.__name__``, so a different registered name would stop nothing.
restful-functions has no stop check a task could call, so the checkpointing task just sleeps
:data:`~bench.peers.base.CHECKPOINT_EVERY` in a loop, like the ignoring one sleeps 10 ms.
"""
from __future__ import annotations

import argparse
import time

from restful_functions import ArgDefinition, ArgType, FunctionServer, TaskStoreSettings

from bench.peers.base import CHECKPOINT_EVERY, CONCURRENCY


def add(x: int, y: int) -> int:
    return x + y


def stamp() -> float:
    return time.time()


def checkpointing() -> None:
    while True:
        time.sleep(CHECKPOINT_EVERY)


def ignoring() -> None:
    while True:
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    server = FunctionServer(host="127.0.0.1", port=args.port,
                            task_store_settings=TaskStoreSettings(sqlite_dsn=args.db))
    integer = ArgType.INTEGER
    server.add_function(add, [ArgDefinition("x", integer, True), ArgDefinition("y", integer, True)],
                        CONCURRENCY, "x + y")
    server.add_function(stamp, [], CONCURRENCY, "time.time() at its first line")
    server.add_function(checkpointing, [], CONCURRENCY, "loops forever")
    server.add_function(ignoring, [], CONCURRENCY, "loops forever")
    server.start()


if __name__ == "__main__":
    main()
