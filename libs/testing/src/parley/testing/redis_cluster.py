"""A Redis Cluster of a test's own on loopback (parley.devstack's LocalRedisCluster: 3
primaries and 3 replicas from the machine's redis-server), for async tests: a test may kill a
primary and wait for its replica to take over."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from parley.devstack.errors import DevstackError
from parley.devstack.redis_cluster import ClusterNode
from parley.devstack.redis_cluster import LocalRedisCluster as _Cluster

__all__ = ["ClusterNode", "LocalRedisCluster"]


class LocalRedisCluster:
    def __init__(self, directory: Path, *, primaries: int = 3) -> None:
        self._cluster = _Cluster(directory, primaries=primaries)

    @property
    def nodes(self) -> list[ClusterNode]:
        return self._cluster.nodes

    @property
    def url(self) -> str:
        """A URL of one node: a cluster client learns the others from it."""
        return self._cluster.url

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._cluster.start)
        except DevstackError as exc:
            pytest.fail(f"the Redis Cluster did not start: {exc}")

    async def stop(self) -> None:
        await asyncio.to_thread(self._cluster.stop)

    async def primary_for(self, key: str) -> ClusterNode:
        """The node that serves `key`'s slot as its primary."""
        return await asyncio.to_thread(self._cluster.primary_for, key)

    async def kill(self, node: ClusterNode) -> None:
        """Kills `node` (SIGKILL) and waits for its process to end."""
        await asyncio.to_thread(node.kill)

    async def hand_over(self, key: str) -> ClusterNode:
        """A manual failover of `key`'s slot (no node fails); the new primary."""
        try:
            return await asyncio.to_thread(self._cluster.hand_over, key)
        except DevstackError as exc:
            pytest.fail(str(exc))

    async def wait_for_failover(self, timeout: float = 30.0) -> None:
        try:
            await asyncio.to_thread(self._cluster.wait_for_failover, timeout)
        except DevstackError as exc:
            pytest.fail(str(exc))
