"""Fixtures of the fault suite: one FaultRun (private redis-server, stores, workers) per scenario."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .clusterharness import ClusterFaultRun
from .harness import FaultRun

MakeRun = Callable[..., FaultRun]
MakeClusterRun = Callable[..., ClusterFaultRun]


@pytest.fixture
def fault_run(tmp_path: Path) -> Iterator[MakeRun]:
    runs: list[FaultRun] = []

    def make(scenario: str, appendonly: bool = False, seed: int = 1) -> FaultRun:
        run = FaultRun(scenario, tmp_path / f"run{len(runs)}", appendonly=appendonly, seed=seed)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


@pytest.fixture
def cluster_run(tmp_path: Path) -> Iterator[MakeClusterRun]:
    """A ClusterFaultRun: a private 3-primary, 3-replica Redis Cluster on loopback ports per scenario."""
    runs: list[ClusterFaultRun] = []

    def make(scenario: str, seed: int = 1) -> ClusterFaultRun:
        run = ClusterFaultRun(scenario, tmp_path / f"cluster{len(runs)}", seed=seed)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()
