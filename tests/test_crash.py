"""A 200 from /report is a promise: in the embedded profile (durable Tansu on SeaweedFS) every
acknowledged report is queryable exactly once after a signal mid-burst and a restart on the
same data dir: SIGINT, kill -9 of the whole platform, the broker alone, the writer alone."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import pytest

from services.common.embedded_s3 import EmbeddedS3
from services.common.kafka import TansuBroker, free_port
from tests.helpers_crash import Up, alive, burst, send, stored, up_env, wait_dead

pytestmark = pytest.mark.slow

REPORTS = 300


def assert_exactly_once(acked: set[int], found: dict[int, int], what: str) -> None:
    lost = sorted(acked - set(found))
    duplicated = sorted(i for i, times in found.items() if times > 1)
    assert not lost, f"{what}: {len(lost)} of {len(acked)} acknowledged reports lost: {lost[:10]}"
    assert not duplicated, f"{what}: reports stored more than once: {duplicated[:10]}"


async def test_sigint_kill9_and_broker_kill_mid_burst_lose_nothing(tmp_path: Path) -> None:
    """One data dir through three runs: Ctrl-C mid-burst, kill -9 of the platform mid-burst, and
    a kill -9 of the broker alone mid-burst (each start is costly, so they share the runs)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = up_env()

    first = Up(data_dir, env).start()
    children = [first.run.get("broker_pid"), first.run.get("s3_pid")]
    assert all(alive(pid) for pid in children)
    clean = await burst(
        first.base, "sigint", REPORTS, trigger_at=REPORTS // 3, trigger=send(first.process.pid, signal.SIGINT)
    )
    assert first.wait_exit(timeout=40) == 0, first.log_tail()
    assert not wait_dead(children), "the broker or S3 outlived a clean stop"
    assert REPORTS // 3 <= len(clean.acked) < REPORTS, clean
    assert clean.retry_after <= {"2"}  # a 503 while stopping says when to come back

    second = Up(data_dir, env).start()
    assert_exactly_once(clean.acked, await stored(second.base, "sigint", len(clean.acked)), "SIGINT")
    children = [second.run.get("broker_pid"), second.run.get("s3_pid")]
    crashed = await burst(
        second.base, "kill9", REPORTS, trigger_at=REPORTS // 3, trigger=send(second.process.pid, 9)
    )
    second.wait_exit(timeout=10)
    assert not wait_dead(children), "the broker or S3 outlived a kill -9 of the platform"
    assert len(crashed.acked) >= REPORTS // 3

    third = Up(data_dir, env).start()
    try:
        assert_exactly_once(crashed.acked, await stored(third.base, "kill9", len(crashed.acked)), "kill -9")
        # and the first run's reports are all still there, once
        assert_exactly_once(clean.acked, await stored(third.base, "sigint", len(clean.acked)), "SIGINT")

        # the broker alone dies mid-burst: the supervisor restarts it on the same port
        broker = await burst(
            third.base, "broker", REPORTS, trigger_at=REPORTS // 3, trigger=send(third.run["broker_pid"], 9)
        )
        assert len(broker.acked) >= REPORTS // 3
        after = await burst(third.base, "after", 20)
        assert len(after.acked) == 20, after
        found = await stored(third.base, "broker", len(broker.acked))
        assert_exactly_once(broker.acked, found, "broker kill")
        assert_exactly_once(after.acked, await stored(third.base, "after", 20), "after the broker restart")
    finally:
        third.process.send_signal(signal.SIGTERM)
        assert third.wait_exit(timeout=40) == 0, third.log_tail()
    assert not (data_dir / "run.json").exists()


async def test_writer_killed_mid_burst_while_the_broker_lives_loses_nothing(tmp_path: Path) -> None:
    """The ClickHouse writer dies at a random point of its batches (kill -9 of the process that
    runs it, the broker living on elsewhere); the next writer resumes from the committed offsets."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    s3 = EmbeddedS3(tmp_path / "s3")
    s3.start()
    tansu = TansuBroker.on_s3(s3, free_port(), tmp_path / "tansu.log")
    tansu.start()
    env = up_env(DISTILLERY_KAFKA_URL=tansu.url)
    try:
        first = Up(data_dir, env).start()
        marker = f"writer-{secrets.token_hex(3)}"
        result = await burst(first.base, marker, REPORTS, trigger_at=REPORTS // 2, trigger=first.kill)
        assert len(result.acked) >= REPORTS // 2
        assert tansu.process is not None and tansu.process.poll() is None  # the broker lived on

        second = Up(data_dir, env).start()
        try:
            assert_exactly_once(result.acked, await stored(second.base, marker, len(result.acked)), "writer")
        finally:
            second.process.send_signal(signal.SIGTERM)
            assert second.wait_exit(timeout=40) == 0, second.log_tail()
    finally:
        tansu.stop()
        s3.stop()
