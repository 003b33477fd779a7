"""What Parley's test suites share: private databases, tokens, free ports, waiting on a
condition with a timeout, and failed calls' status details decoded.

Only tests import this package; no service depends on it.
"""

from parley.testing.databases import ADMIN_URL, DatabaseFactory, database_url
from parley.testing.errors import RichError, rich_error
from parley.testing.metrics import sample_key, scrape_metrics
from parley.testing.network import free_port, health_status
from parley.testing.processes import rss_bytes
from parley.testing.redis_server import RedisServer
from parley.testing.tokens import bearer, make_token
from parley.testing.waiting import wait_until, wait_until_sync

__all__ = [
    "ADMIN_URL",
    "DatabaseFactory",
    "RedisServer",
    "RichError",
    "bearer",
    "database_url",
    "free_port",
    "health_status",
    "make_token",
    "rich_error",
    "rss_bytes",
    "sample_key",
    "scrape_metrics",
    "wait_until",
    "wait_until_sync",
]
