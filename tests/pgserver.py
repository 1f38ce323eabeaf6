"""The tests' private PostgreSQL cluster: the benchmarks' (:mod:`bench.pgcluster`), made in a temporary folder
on a port the test picks, owned by the ``postgres`` user when the tests run as root."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: bench/

from bench.pgcluster import DATABASE, PASSWORD, PostgresCluster, bin_dir  # noqa: E402

__all__ = ["DATABASE", "PASSWORD", "PostgresCluster", "bin_dir"]
