"""Call Distillery over gRPC from stubs you generate yourself from ``protos/`` (no Distillery code).

    python -m pip install grpcio grpcio-tools
    mkdir -p gen && python -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen \\
        protos/distillery/v1/*.proto
    PYTHONPATH=gen python examples/grpc_client.py --target localhost:50051 --key opk_...

The port is plaintext (put TLS in front of it, e.g. at the ingress, outside one machine). Every
call carries ``authorization: Bearer <project key>`` metadata. A request message may be as large
as an HTTP body (``DISTILLERY_MAX_BODY_BYTES``, 8 MB by default); answers can be larger (a log
carries its raw and normalized payloads), so raise the client's receive limit as below.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import grpc
from distillery.v1 import inference_pb2, inference_pb2_grpc, logs_pb2, logs_pb2_grpc

RECEIVE_LIMIT = 64 * 1024 * 1024


def describe(error: grpc.aio.AioRpcError) -> str:
    """Code, message, and the OpenAI error fields the server sends as trailing metadata."""
    extra = {k: v for k, v in error.trailing_metadata() or () if k.startswith("error-")}
    return f"{error.code().name}: {error.details()} {extra or ''}".strip()


async def main(target: str, key: str, model: str) -> None:
    metadata = (("authorization", f"Bearer {key}"),)
    options = [("grpc.max_receive_message_length", RECEIVE_LIMIT)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}]}
        request = inference_pb2.CompletionRequest(request_json=json.dumps(body), log_request=True)
        try:
            answer = await inference.Complete(request, metadata=metadata, timeout=60)
            completion = json.loads(answer.completion_json)
            print("complete:", completion["choices"][0]["message"]["content"])
            chunks = inference.StreamComplete(request, metadata=metadata, timeout=60)
            text = ""
            async for chunk in chunks:
                choices = json.loads(chunk.chunk_json)["choices"]
                text += (choices[0]["delta"].get("content") or "") if choices else ""
            print("stream:", text)
        except grpc.aio.AioRpcError as error:
            print("inference failed:", describe(error))

        logs = logs_pb2_grpc.LogQueryStub(channel)
        count = await logs.Count(
            logs_pb2.CountLogsRequest(filters=logs_pb2.LogFilters(model=model)), metadata=metadata, timeout=30
        )
        print("logs:", count.count)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="localhost:50051", help="host:port of distillery's gRPC")
    parser.add_argument("--key", required=True, help="a project API key (opk_...)")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    asyncio.run(main(args.target, args.key, args.model))
