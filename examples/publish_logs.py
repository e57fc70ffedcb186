"""Publish request logs straight to Kafka, as an internal service would (no HTTP hop).

    distillery info        # prints the broker address and your project id
    python examples/publish_logs.py --kafka 127.0.0.1:<port> --project proj_123 --count 100

Without ``--kafka`` the broker of a ``distillery up`` on ``.distillery`` is used (its run.json).

Plain aiokafka and JSON: a producer needs no Distillery code. The event schema is in
docs/log-events.md. Keep ``log_id`` stable for a given call: re-sending the same id
never creates a duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

from aiokafka import AIOKafkaProducer

TOPIC = "logs.v1"


def uuid7() -> str:
    """Time-ordered ids make 'newest first' listings follow capture order."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ms << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def log_event(project_id: str, request: dict, response: dict, *, latency_ms: int, metadata: dict) -> dict:
    received = int(time.time() * 1000)
    return {
        "schema_version": 1,
        "log_id": uuid7(),
        "project_id": project_id,
        "source": "openai",
        "requested_at": received - latency_ms,
        "received_at": received,
        "req_payload": request,
        "resp_payload": response,
        "status_code": 200,
        "metadata": metadata,
    }


async def publish(kafka_url: str, events: list[dict]) -> None:
    """Send every event keyed by project id and wait until Kafka has acknowledged all of them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_url, linger_ms=5, max_batch_size=1 << 20, enable_idempotence=False, acks="all"
    )
    await producer.start()
    try:
        sends = [
            await producer.send(TOPIC, json.dumps(e).encode(), key=e["project_id"].encode()) for e in events
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


def running_broker(data_dir: str) -> str:
    """The Kafka address `distillery up` recorded in its data dir (it picks a free port)."""
    run_file = os.path.join(data_dir, "run.json")
    if not os.path.exists(run_file):
        raise SystemExit(f"no platform is running on {data_dir}: pass --kafka host:port")
    with open(run_file) as f:
        return json.load(f)["kafka_url"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", default=None, help="bootstrap servers (default: the running platform's)")
    parser.add_argument("--data-dir", default=".distillery", help="data dir of `distillery up`")
    parser.add_argument("--project", required=True, help="project id (see `distillery keys create`)")
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}
    response = {
        "id": "chatcmpl-example",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    events = [
        log_event(args.project, request, response, latency_ms=350, metadata={"source": "example"})
        for _ in range(args.count)
    ]
    asyncio.run(publish(args.kafka or running_broker(args.data_dir), events))
    print(f"published {len(events)} log events to {TOPIC}")


if __name__ == "__main__":
    main()
