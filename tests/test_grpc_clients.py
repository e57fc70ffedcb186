"""gRPC as an outside team uses it: stubs generated from ``protos/`` alone (not the committed ones),
in a separate process, following the documented auth, limits and error codes.

The client runs in a subprocess because its freshly generated stubs register the same proto
files as the platform's own stubs, which one protobuf descriptor pool refuses twice.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Project, RunningPlatform, wait_until
from tests.fake_upstream import OPENAI_KEY

ROOT = Path(__file__).resolve().parents[1]

# Each case: (name, stub call) run against the live platform; prints {name: [code, details]}.
PROBE = r"""
import asyncio, json, sys
import grpc
from distillery.v1 import inference_pb2, inference_pb2_grpc, logs_pb2, logs_pb2_grpc

target, key = sys.argv[1], sys.argv[2]
auth = (("authorization", f"Bearer {key}"),)
wrong = (("authorization", "Bearer opk_nope"),)
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})

async def outcome(call):
    try:
        await call
        return ["OK", ""]
    except grpc.aio.AioRpcError as e:
        return [e.code().name, e.details()]

async def stream_outcome(call):
    try:
        [_ async for _ in call]
        return ["OK", ""]
    except grpc.aio.AioRpcError as e:
        return [e.code().name, e.details()]

async def main():
    async with grpc.aio.insecure_channel(target) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        logs = logs_pb2_grpc.LogQueryStub(channel)
        request = inference_pb2.CompletionRequest(request_json=body)
        raw_complete = channel.unary_unary("/distillery.v1.Inference/Complete")
        raw_search = channel.unary_stream("/distillery.v1.LogQuery/Search")
        huge = body.replace('"hi"', '"' + "x" * (9 << 20) + '"')
        results = {
            "no_key": await outcome(inference.Complete(request)),
            "wrong_key": await outcome(inference.Complete(request, metadata=wrong)),
            "ok": await outcome(inference.Complete(request, metadata=auth)),
            "bad_json": await outcome(inference.Complete(
                inference_pb2.CompletionRequest(request_json="{not json"), metadata=auth)),
            "corrupt_bytes": await outcome(raw_complete(b"\xff\xff\xff\xff", metadata=auth)),
            "corrupt_stream": await stream_outcome(raw_search(b"\x0a\xff\xff", metadata=auth)),
            "too_large": await outcome(inference.Complete(
                inference_pb2.CompletionRequest(request_json=huge), metadata=auth)),
            "bad_filter": await outcome(logs.Count(
                logs_pb2.CountLogsRequest(filters=logs_pb2.LogFilters(status="maybe")), metadata=auth)),
            "count": await outcome(logs.Count(logs_pb2.CountLogsRequest(), metadata=auth)),
        }
    print(json.dumps(results))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def generated_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the README tells a team to run: protoc over protos/ into a folder of their own."""
    out = tmp_path_factory.mktemp("stubs")
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos/distillery/v1").glob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos"]
    subprocess.run(
        [*command, f"--python_out={out}", f"--grpc_python_out={out}", *protos], cwd=ROOT, check=True
    )
    return out


async def run_client(stubs: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env={"PYTHONPATH": str(stubs), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def ready_project(project: Project) -> None:
    """The project's OpenAI key (it reaches the router over catalog.v1: callers below retry)."""
    async with project.client() as client:
        assert (await client.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200


async def test_generated_stubs_get_the_documented_codes(
    generated_stubs: Path, project: Project, running: RunningPlatform
) -> None:
    await ready_project(project)
    target = f"127.0.0.1:{running.settings.grpc_port}"
    script = generated_stubs / "probe.py"
    script.write_text(PROBE)

    results: dict[str, list[str]] = {}

    async def probed() -> bool:
        nonlocal results
        results = json.loads(await run_client(generated_stubs, str(script), target, project.key))
        return results["ok"][0] == "OK"

    await wait_until(probed, timeout=30, what="the router to learn the provider key")
    assert results["no_key"][0] == "UNAUTHENTICATED" and results["wrong_key"][0] == "UNAUTHENTICATED"
    assert "opk_nope" not in results["wrong_key"][1]
    assert results["bad_json"][0] == "INVALID_ARGUMENT" and "request_json" in results["bad_json"][1]
    for case in ("corrupt_bytes", "corrupt_stream"):
        code, details = results[case]
        assert code == "INVALID_ARGUMENT", results[case]
        assert "not a valid" in details and "class" not in details and "DecodeError" not in details
    assert results["too_large"][0] == "RESOURCE_EXHAUSTED" and "limit" in results["too_large"][1]
    assert results["bad_filter"][0] == "INVALID_ARGUMENT" and "filters.status" in results["bad_filter"][1]
    assert results["count"] == ["OK", ""]


async def test_the_readme_example_client_runs(
    generated_stubs: Path, project: Project, running: RunningPlatform
) -> None:
    await ready_project(project)
    target = f"127.0.0.1:{running.settings.grpc_port}"
    output = ""

    async def answered() -> bool:
        nonlocal output
        output = await run_client(
            generated_stubs, "examples/grpc_client.py", "--target", target, "--key", project.key
        )
        return "complete: Answer to: Say hi" in output

    await wait_until(answered, timeout=30, what="the example to get an answer")
    assert "stream: Answer to: Say hi" in output
    assert "logs:" in output
