"""Eval throughput: rows graded per second for code evals and for judge-bound evals.

1. sandbox: one locked-down grader process (``services.eval.sandbox``) grading rows with a trivial
   grader, in the bench process (the isolation cost per row, with no platform around it);
2. code eval end to end: ``POST /evals`` with a code evaluator on the dataset's own outputs,
   through Kafka, the eval worker, its sandbox and the api applying one event per row;
3. judge-bound eval: a head-to-head eval of two models whose every pair needs the judge, against
   a fake OpenAI-compatible upstream (``tests/helpers_eval.py``) answering after ``--latency``
   seconds, with ``--concurrency`` model calls in flight per worker.

Tansu and ``distillery up`` run in their own processes (``bench/platform_stack.py``); the fake
upstream runs in this process. Prints numbers; asserts nothing.

    .venv/bin/python bench/eval.py                      # defaults (~1 min)
    .venv/bin/python bench/eval.py --rows 2000 --judge-rows 200 --latency 0.2 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.platform_stack import Http, PlatformStack  # noqa: E402
from services.eval.sandbox import Sandbox  # noqa: E402
from tests.helpers_eval import JUDGE_KEY, start_fake_judge  # noqa: E402

TRIVIAL = "def grader(messages, tools, tool_choice, generated_output, dataset_output):\n    return 1.0\n"


async def sandbox_rate(rows: int) -> float:
    args = [[[{"role": "user", "content": "q"}], None, None, {"content": "a"}, {"content": "a"}]] * rows
    async with Sandbox(TRIVIAL, owner="bench") as box:
        await box.grade(args[:100])  # warm
        started = time.perf_counter()
        await box.grade(args)
        return rows / (time.perf_counter() - started)


def fake_upstream(latency: float) -> str:
    """The fake judge/model server on its own event loop thread; returns its base URL."""
    ready: dict[str, str] = {}
    started = threading.Event()

    def serve() -> None:
        async def main() -> None:
            fake, _server, task = await start_fake_judge(latency=latency)
            ready["url"] = fake.base_url
            started.set()
            await task

        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    started.wait(30)
    return ready["url"]


def make_dataset(http: Http, rows: int) -> str:
    status, dataset = http.json("POST", "/api/v1/datasets", {"name": f"bench {rows}"})
    assert status == 200 or status == 201, dataset
    for start in range(0, rows, 1000):
        entries = [
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ],
                "split": "TEST",
            }
            for i in range(start, min(rows, start + 1000))
        ]
        status, created = http.json("POST", f"/api/v1/datasets/{dataset['id']}/entries", {"entries": entries})
        assert status == 200 and created["entries_created"] == len(entries), created
    return dataset["id"]


def run_eval(stack: PlatformStack, http: Http, body: dict) -> tuple[float, dict]:
    status, started = http.json("POST", "/api/v1/evals", body)
    assert status == 202, started
    begun = time.perf_counter()
    state: dict = {}

    def done() -> bool:
        nonlocal state
        _, state = http.json("GET", f"/api/v1/evals/{started['id']}")
        return state["status"] in ("succeeded", "failed", "cancelled")

    while not done():  # a monotonic clock: this VM's wall clock jumps
        if time.perf_counter() - begun > 900:
            raise RuntimeError(f"eval {started['id']} did not finish: {state}\n{stack.log_tail()}")
        time.sleep(0.05)
    return time.perf_counter() - begun, state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sandbox-rows", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=2_000, help="entries of the code eval")
    parser.add_argument("--judge-rows", type=int, default=200, help="entries of the head-to-head eval")
    parser.add_argument("--latency", type=float, default=0.2, help="fake upstream latency, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="model calls in flight per eval worker")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    rate = asyncio.run(sandbox_rate(args.sandbox_rows))
    print(f"sandbox, trivial grader: {rate:,.0f} rows/s (one process, {args.sandbox_rows} rows)")

    upstream = fake_upstream(args.latency)
    with PlatformStack(args.keep, prefix="distillery-bench-eval-") as stack:
        stack.start_broker()
        _, key = stack.create_key("bench-eval")
        stack.start_platform(env={"DISTILLERY_EVAL_CONCURRENCY": str(args.concurrency)})
        http = Http(stack.port, key)
        status, provider = http.json(
            "POST",
            "/api/v1/external-providers",
            {"slug": "judge", "type": "openai", "baseUrl": upstream, "apiKey": JUDGE_KEY},
        )
        assert status == 201, provider
        probe = {"model": "openpipe:judge/probe", "messages": [{"role": "user", "content": "hi"}]}
        stack.wait_for(
            lambda: http.json("POST", "/api/v1/chat/completions", probe)[0] == 200, 60, "routing the fake"
        )

        # Warm-up: the worker's and the api's consumer groups join on the first eval.
        warm = make_dataset(http, 5)
        run_eval(
            stack,
            http,
            {
                "name": "warm-up",
                "datasetId": warm,
                "models": ["original", "openpipe:judge/warm"],
                "evaluators": [{"type": "code", "name": "trivial", "source": TRIVIAL}],
            },
        )
        code_dataset = make_dataset(http, args.rows)
        seconds, state = run_eval(
            stack,
            http,
            {
                "name": "bench code",
                "datasetId": code_dataset,
                "models": ["original"],
                "evaluators": [{"type": "code", "name": "trivial", "source": TRIVIAL}],
            },
        )
        print(
            f"code eval end to end: {args.rows / seconds:,.0f} rows/s "
            f"({args.rows} rows in {seconds:.1f} s, {state['status']})    target >= 500 rows/s"
        )

        judge_dataset = make_dataset(http, args.judge_rows)
        seconds, state = run_eval(
            stack,
            http,
            {
                "name": "bench judge",
                "datasetId": judge_dataset,
                "models": ["original", "openpipe:judge/student"],
                "evaluators": [{"type": "head_to_head", "judgeModel": "openpipe:judge/referee"}],
            },
        )
        calls = 2 * args.judge_rows  # one generation and one judgement per row
        print(
            f"judge-bound eval (head-to-head, {args.latency * 1000:.0f} ms upstream, concurrency "
            f"{args.concurrency}): {args.judge_rows / seconds:,.1f} rows/s, {calls / seconds:,.1f} model "
            f"calls/s ({args.judge_rows} rows in {seconds:.1f} s, {state['status']}); "
            f"bound: concurrency / latency = {args.concurrency / args.latency:,.0f} calls/s"
        )
        http.close()


if __name__ == "__main__":
    main()
