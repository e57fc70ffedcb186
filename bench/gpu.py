"""The GPU check: the trainer's and the model server's CUDA paths, on bases of real size, in one run.

    python bench/gpu.py --tokenizer DIR     # DIR: a chat base's folder (config.json + tokenizer)

CI and the CPU benches never reach the code that only runs on a GPU: the padding-free collator
(``services.trainer.sft.flatten_collator``), the GPU token budget, bf16 training and serving on
CUDA. This runs them on the machine it is started on, which must have a CUDA GPU.

A GPU machine here starts bare (no hub, and SmolLM2's 540 MB checkpoint is too large to carry), so
the bases are random-init, each with the tokenizer and chat template from ``--tokenizer``:

- ``bench/smollm2-135m-random``: that folder's own architecture (SmolLM2-135M's);
- ``bench/llama-1.5b-random``: Qwen2-1.5B's shape (hidden 1536, 28 layers, 12 heads, 2 KV heads).

Speed does not depend on the weights' values; losses and answers do, so compare ours with TRL and
the model server with plain ``generate()`` on the same base, never with the CPU runs. Each base is
uploaded to a blob store as ops upload one (``upload_model``) and cached in the model store, then:

1. the padding-free step is exact: the loss over rows flattened into one sequence (what training on
   a GPU feeds the model) equals the padded batch's, in fp32; and what one step at about the GPU
   token budget costs flattened, as length-grouped padded micro-batches, and as one padded batch;
2. ``bench/train.py`` (our SFT against plain TRL) on each base;
3. ``bench/train.py --quality --preference``: the trainer's own job run (snapshot, auto batch
   size, LoRA SFT then DPO, adapter saved) on CUDA;
4. ``bench/serve.py --no-router`` (model server against plain ``generate()``) on each base.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository root instead of bench/ (whose datasets.py would shadow the `datasets` package).
sys.path[0] = str(ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = "bench/smollm2-135m-random"
LARGE = "bench/llama-1.5b-random"
LARGE_SHAPE = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "head_dim": 128,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_base(name: str, tokenizer_dir: Path, shape: dict, store: Path) -> Path:
    """A random-init base of ``shape`` with ``tokenizer_dir``'s tokenizer, put in the model store."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.common.blobstore import FileBlobStore
    from services.common.model_store import ensure_base_model, upload_model

    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        for file in TOKENIZER_FILES:
            if (tokenizer_dir / file).exists():
                shutil.copy(tokenizer_dir / file, folder / file)
        blobs = FileBlobStore(Path(tmp) / "blobs")
        upload_model(name, folder, blobs)
        base_dir = ensure_base_model(name, store_dir=store, blobs=blobs)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {params:.0f}M parameters, in the model store at {base_dir}", flush=True)
    return base_dir


def check_flattening(base_dir: Path, rows: int = 16) -> None:
    """Summed loss of the same rows as one padded batch and as one flattened sequence, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    from services.trainer.data import IGNORE, tokenize_sft
    from services.trainer.sft import PadCollator, flatten_collator

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device()).eval()
    # As the trainer runs it: with a KV cache transformers builds no packed-sequence mask.
    model.config.use_cache = False
    features = [tokenize_sft(tokenizer, row, 2048) for row in bench_train.rows(rows)]

    def summed_loss(batch: dict) -> tuple[float, int]:
        batch = {k: v.to(device()) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum"
        )
        return float(loss), int((target != IGNORE).sum())

    padded, padded_count = summed_loss(PadCollator(tokenizer.pad_token_id)(features))
    flat_batch = flatten_collator()(features)
    flat, flat_count = summed_loss(flat_batch)
    shape = tuple(flat_batch["input_ids"].shape)
    print(
        f"flattened vs padded ({rows} rows, one sequence of {shape[1]} tokens): loss per token "
        f"{flat / flat_count:.6f} vs {padded / padded_count:.6f} over {flat_count} vs {padded_count} "
        f"labels, relative difference {abs(flat - padded) / padded:.1e}",
        flush=True,
    )


def time_step_layouts(base_dir: Path, rows: int, longest: int, repeats: int = 3) -> None:
    """One LoRA training step over ``rows`` rows of 64..``longest`` tokens (about the GPU token
    budget), laid out three ways: flattened into one sequence (what a GPU step uses), the trainer's
    length-grouped padded micro-batches (what a CPU step uses), and one padded batch. Without a
    varlen attention kernel the flattened sequence gets a dense mask and attention over all of it."""
    import random

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from services.trainer.sft import PadCollator, flatten_collator, length_groups, lora_config

    dtype = torch.bfloat16 if device() == "cuda" else torch.float32  # a CPU may only emulate bf16
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device())
    model.config.use_cache = False
    model = get_peft_model(model, lora_config())
    rnd = random.Random(0)
    features = []
    for _ in range(rows):
        ids = [rnd.randrange(10, model.config.vocab_size) for _ in range(rnd.randint(64, longest))]
        features.append({"input_ids": ids, "labels": ids})
    pad = PadCollator(0)
    lengths = [len(f["input_ids"]) for f in features]
    layouts = {
        "flattened": [flatten_collator()(features)],
        "length-grouped micro-batches": [pad([features[i] for i in g]) for g in length_groups(lengths)],
        "one padded batch": [pad(features)],
    }
    attention = model.config._attn_implementation
    print(f"one step of {rows} rows, {sum(lengths)} tokens (longest {max(lengths)}), attention {attention}:")
    for name, batches in layouts.items():
        batches = [{k: v.to(device()) for k, v in b.items()} for b in batches]
        times = []
        for repeat in range(repeats + 1):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                for batch in batches:
                    model(**batch).loss.backward()
            except torch.OutOfMemoryError:
                times = []
                break
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        result = f"{1000 * sum(times) / len(times):7.0f} ms" if times else "out of memory"
        print(f"  {name:>30}: {result}, {len(batches)} pass(es), peak {peak:.1f} GiB", flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench(args: list[str], limit: float) -> None:
    print(f"\n$ python bench/{' '.join(args)}", flush=True)
    started = time.perf_counter()
    try:
        command = [sys.executable, f"bench/{args[0]}", *args[1:]]
        done = subprocess.run(command, cwd=ROOT, timeout=limit, check=False)
        status = f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        status = f"stopped at its {limit:.0f} s limit"
    print(f"({status} after {time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a chat base's folder")
    parser.add_argument("--store-dir", type=Path, default=ROOT / ".distillery" / "models")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True, help="the 1.5B too")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: tests this script")
    parser.add_argument("--steps", default="check,layouts,train,serve,quality", help="which of them to run")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA GPU here: this check is for a GPU machine")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{gpu}, torch {torch.__version__}", flush=True)
    store = args.store_dir.resolve()
    os.environ["DISTILLERY_MODEL_STORE_DIR"] = str(store)
    base_dirs = {SMALL: make_base(SMALL, args.tokenizer, {}, store)}
    if args.large:
        base_dirs[LARGE] = make_base(LARGE, args.tokenizer, LARGE_SHAPE, store)
    steps = set(args.steps.split(","))
    if "check" in steps:
        check_flattening(base_dirs[SMALL])
    if "layouts" in steps:
        time_step_layouts(base_dirs[LARGE if args.large else SMALL], *((8, 128) if args.smoke else (32, 960)))
    rows, requests, tokens = (16, 2, 8) if args.smoke else (512, 16, 64)
    serve = ["--no-router", "--requests", str(requests), "--max-tokens", str(tokens)]
    serve += ["--store-dir", str(store), "--concurrency", "1,2" if args.smoke else "1,8,16"]
    for base in base_dirs:
        if "train" in steps:
            bench(["train.py", "--base", base, "--rows", str(rows if base == SMALL else rows // 2)], 150)
        if "serve" in steps:
            bench(["serve.py", "--base", base, *serve], 200)
    if "quality" in steps:
        bench(["train.py", "--quality", "--preference", "--base", SMALL, "--rows", str(rows // 2)], 150)


if __name__ == "__main__":
    main()
