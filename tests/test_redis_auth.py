"""Redis with a password (a real redis-server started with requirepass): the placement and load stores and the
admin commands work through `redis://:PASSWORD@host:port/db` URLs, a wrong password is one clear line that never
shows the password."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import redis

from services.cli.admin import RedisUnreachableError, check_redis
from services.format.config import ModelConfig
from services.rpc.processes import free_port
from services.state.load_store import RedisLoadStore
from services.state.placement import Placement, Pool
from services.state.placement_store import RedisPlacementStore
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
PASSWORD = "s3cret-pass"


@pytest.fixture(scope="module")
def protected_redis():
    port = free_port()
    proc = subprocess.Popen(
        [
            shutil.which("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            PASSWORD,
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=PASSWORD)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(answers, 30, "redis-server with requirepass to answer")
    yield port
    proc.terminate()
    proc.wait(10)


def test_stores_work_through_a_password_url(protected_redis, tiny_fp8):
    url = f"redis://:{PASSWORD}@127.0.0.1:{protected_redis}/0"
    check_redis(url)
    cfg = ModelConfig.from_file(tiny_fp8)
    store = RedisPlacementStore(url)
    published = store.publish(Placement.spread(cfg, [Pool("pool-0", "127.0.0.1:1"), Pool("pool-1", "127.0.0.1:2")]))
    assert store.get().replicas == published.replicas
    loads = RedisLoadStore.from_url(url, cfg.moe_layers, cfg.n_routed_experts)
    counts = np.ones((len(cfg.moe_layers), cfg.n_routed_experts), np.int64)
    loads.write({int(time.time() // 5): counts})
    assert loads.window(60).sum() == counts.sum()
    show = subprocess.run(
        [sys.executable, "-m", "services.cli.app", "placement", "show", "--redis", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0 and '"pool-0"' in show.stdout, show.stderr


@pytest.mark.parametrize("password", ["wrong-pass", None])
def test_wrong_or_missing_password_is_one_clear_line(protected_redis, password):
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{protected_redis}/0"
    with pytest.raises(RedisUnreachableError) as err:
        check_redis(url)
    message = str(err.value)
    assert "unreachable" in message and "\n" not in message
    assert PASSWORD not in message and (password is None or password not in message)
