"""A Redis Cluster of a test's own on loopback: primaries with a replica each, from the
machine's redis-server (REDIS_SERVER, Debian's; sharded pub/sub needs Redis 7), made with
`redis-cli --cluster create`. A test may kill a primary and wait for its replica to take over."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.exceptions import RedisError

from parley.testing.network import free_port
from parley.testing.redis_server import REDIS_SERVER, RedisServer
from parley.testing.waiting import wait_until

__all__ = ["LocalRedisCluster"]

SLOTS = 16384
# How long a node may be unreachable before the others count it as failed: short, so a
# failover test takes seconds (Redis's default is 15 s).
NODE_TIMEOUT_MS = 1000
_CREATE_TIMEOUT = 60.0


class LocalRedisCluster:
    """`primaries` primaries with one replica each, every node on a free port of 127.0.0.1
    (its cluster bus on another), keeping nothing but its nodes.conf on disk."""

    def __init__(self, directory: Path, *, primaries: int = 3) -> None:
        self.directory = directory
        self.nodes: list[RedisServer] = []
        for index in range(primaries * 2):
            node_dir = directory / f"node-{index}"
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    node_dir,
                    executable=REDIS_SERVER,
                    extra_config=(
                        "cluster-enabled yes",
                        "cluster-config-file nodes.conf",
                        f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                        f"cluster-port {free_port()}",
                        # A replica takes over however long it was cut off from its primary.
                        "cluster-replica-validity-factor 0",
                    ),
                )
            )
        self._primaries = primaries

    @property
    def url(self) -> str:
        """A URL of one node: a cluster client learns the others from it."""
        return self.nodes[0].url

    @property
    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    async def start(self) -> None:
        """Starts every node, joins them into a cluster (the first `primaries` nodes as
        primaries) and waits until every slot is served and every primary has its replica."""
        await asyncio.gather(*(node.start() for node in self.nodes))
        cli = shutil.which("redis-cli", path=str(Path(REDIS_SERVER).parent)) or "redis-cli"
        process = await asyncio.create_subprocess_exec(
            cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), _CREATE_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            pytest.fail("redis-cli --cluster create did not finish")
        if process.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {output.decode(errors='replace')}")
        await wait_until(
            self._healthy, timeout=30, what="the cluster to serve every slot with replicas"
        )

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def primary_for(self, key: str) -> RedisServer:
        """The running node that serves `key`'s slot as its primary."""
        async with self._client(self.running[0]) as client:
            slot = int(await client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_replicas in await self._slots(client):
                if start <= slot <= end:
                    return self._node(int(primary[1]))
        raise AssertionError(f"no node serves slot {slot}")

    async def kill(self, node: RedisServer) -> None:
        """Kills `node` (SIGKILL: no goodbye to the others) and waits for its process to end."""
        assert node.process is not None
        node.process.send(signal.SIGKILL)
        await node.stop()

    async def wait_for_failover(self, timeout: float = 30.0) -> None:
        """Waits until the running nodes serve every slot again, each from a running primary."""
        await wait_until(
            lambda: self._served(require_replicas=False),
            timeout=timeout,
            what="a replica to take over the killed primary's slots",
        )

    def _node(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise AssertionError(f"no node on port {port}")

    def _client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis.from_url(node.url, socket_timeout=2, socket_connect_timeout=2)

    @staticmethod
    async def _slots(client: redis.Redis) -> list[list[object]]:
        # CLUSTER SLOTS raw: [start, end, [host, port, id], [replica...], ...] per range.
        return list(await client.execute_command("CLUSTER SLOTS", NEVER_DECODE=True))

    async def _healthy(self) -> bool:
        return await self._served(require_replicas=True)

    async def _served(self, *, require_replicas: bool) -> bool:
        """True when every running node says the cluster is ok and that every slot is served
        by a running primary (with a replica each, when `require_replicas`)."""
        running = {node.port for node in self.running}
        try:
            for node in self.running:
                async with self._client(node) as client:
                    info = await client.execute_command("CLUSTER INFO")
                    if info.get("cluster_state") != "ok":
                        return False
                    covered = 0
                    primaries = set()
                    for start, end, primary, *replicas in await self._slots(client):
                        if int(primary[1]) not in running:  # type: ignore[index]
                            return False
                        if require_replicas and not replicas:
                            return False
                        primaries.add(int(primary[1]))  # type: ignore[index]
                        covered += int(end) - int(start) + 1  # type: ignore[call-overload]
                    if covered != SLOTS or len(primaries) != self._primaries:
                        return False
        except (RedisError, OSError):
            return False
        return True
