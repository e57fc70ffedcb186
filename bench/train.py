"""SFT throughput: our LoRA SFT path versus a plain TRL ``SFTTrainer`` on the same model, data and epochs.

    .venv/bin/python bench/train.py                       # both bases
    .venv/bin/python bench/train.py --base distillery/tiny-chat --rows 256 --epochs 1

Each run happens in its own process (so peak RSS is its own). Both runs train a LoRA adapter (same
rank, targets, learning rate, rows per step and epochs) on the same synthetic chat rows of varied
length; the loss covers assistant tokens in both. "Plain TRL" is ``SFTTrainer`` with its defaults
plus what CPU needs (``use_cpu=True``) and ``assistant_only_loss=True``. Tokens/s counts the
tokens of the rows trained (prompt and answer, no padding) over the training wall time; the final
loss is each trained model's mean loss per assistant token on the data. Ends with
one line per base: ``sft tokens/s vs plain trl: 1.62x (ours N, trl M, final loss a vs b)``.

``--quality`` instead fine-tunes SmolLM2 through the trainer's own run on a sentiment task and
prints exact match on a held-out split, base versus fine-tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repository root instead of bench/ (whose datasets.py would shadow the `datasets` package).
sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASES = ("distillery/tiny-chat", "HuggingFaceTB/SmolLM2-135M-Instruct")
DEFAULT_ROWS = {"distillery/tiny-chat": 256, "HuggingFaceTB/SmolLM2-135M-Instruct": 64}
BATCH = 8
LEARNING_RATE = 2e-4
WORDS = [
    "the", "order", "shipped", "yesterday", "and", "should", "arrive", "soon",
    "please", "check", "status", "of", "my", "refund", "today", "thanks",
]  # fmt: skip


def rows(n: int, seed: int = 0) -> list[dict]:
    """Support-style chats of varied length: a system prompt, a question, a short or long answer."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        question = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 40)))
        answer = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 60)))
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a support agent. Answer briefly."},
                    {"role": "user", "content": f"Ticket {i}: {question}?"},
                    {"role": "assistant", "content": answer.capitalize() + "."},
                ],
                "tools": None,
            }
        )
    return out


def final_loss(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def data_loss(model, tokenizer, data: list[dict], batch_size: int) -> float:  # type: ignore[no-untyped-def]
    """The trained model's mean loss per assistant token over all rows (same labels for both runs)."""
    import torch

    from services.trainer.data import IGNORE, tokenize_sft
    from services.trainer.sft import PadCollator

    collate = PadCollator(tokenizer.pad_token_id)
    tokenized = [tokenize_sft(tokenizer, row, 2048) for row in data]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokenized), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(tokenized[i : i + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum"
            )
            total += float(losses)
            count += int((labels != IGNORE).sum())
    return total / max(count, 1)


def run_ours(base_dir: Path, data: list[dict], epochs: int, batch_size: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.data import tokenize_sft
    from services.trainer.sft import Progress, lora_config, sft_trainer, training_arguments, use_bf16

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)  # the LoRA init, as the trainer seeds it (and as the TRL run below does)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora_config())
    tokenized = [tokenize_sft(tokenizer, row, 2048) for row in data]
    args = training_arguments(
        out,
        learning_rate=LEARNING_RATE,
        epochs=epochs,
        batch_size=batch_size,
        save_steps=10**9,
        seed=0,
        bf16=use_bf16(model),
    )
    args["save_strategy"] = "no"
    progress = Progress(
        phase="sft",
        on_metrics=lambda d: None,
        on_checkpoint=lambda *a: None,
        control_state=lambda: None,
        tokens_seen=lambda: 0,
        epochs=epochs,
    )
    trainer = sft_trainer(model, tokenizer, Dataset.from_list(tokenized), args, progress)
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(len(t["input_ids"]) for t in tokenized) * epochs
    losses = [loss for _, loss in progress.losses]
    return {
        "wall": wall,
        "cpu": cpu,
        "tokens": tokens,
        "losses": losses,
        "data_loss": data_loss(trainer.model, tokenizer, data, batch_size),
    }


def run_trl(base_dir: Path, data: list[dict], epochs: int, batch_size: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from services.trainer.data import tokenize_sft
    from services.trainer.sft import lora_config

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = SFTConfig(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        assistant_only_loss=True,
        seed=0,
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"messages": row["messages"]} for row in data])
    torch.manual_seed(0)  # SFTTrainer creates the LoRA adapter before it seeds anything itself
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[Losses()],
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(len(tokenize_sft(tokenizer, row, 2048)["input_ids"]) for row in data) * epochs
    return {
        "wall": wall,
        "cpu": cpu,
        "tokens": tokens,
        "losses": losses,
        "data_loss": data_loss(trainer.model, tokenizer, data, batch_size),
    }


def child(which: str, base: str, n: int, epochs: int, batch_size: int) -> None:
    """One measured run; prints its result as JSON on the last line."""
    from services.common.model_store import ensure_base_model

    store = Path(os.environ.get("DISTILLERY_MODEL_STORE_DIR", ".distillery/models"))
    base_dir = ensure_base_model(base, store_dir=store)
    data = rows(n)
    with tempfile.TemporaryDirectory() as out:
        result = (run_ours if which == "ours" else run_trl)(base_dir, data, epochs, batch_size, Path(out))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(which: str, base: str, n: int, epochs: int, batch_size: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--base",
        base,
        "--rows",
        str(n),
        "--epochs",
        str(epochs),
        "--batch",
        str(batch_size),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{which} run on {base} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_second"] = result["tokens"] / result["wall"]
    result["tokens_per_cpu_second"] = result["tokens"] / result["cpu"]
    # "final loss": the trained model's loss on the data (the last logged steps' loss depends on
    # which rows those steps happened to hold, which differs between the two samplers).
    result["final_loss"] = result["data_loss"]
    result["last_steps_loss"] = final_loss(result["losses"])
    return result


SENTIMENT_SYSTEM = "Classify the review's sentiment. Answer with one word: positive, negative or neutral."
OPINIONS = {
    "positive": ["loved it", "was wonderful", "exceeded my hopes", "was a delight", "works perfectly"],
    "negative": ["was awful", "broke after a day", "was a waste of money", "disappointed me", "never worked"],
    "neutral": ["arrived on tuesday", "is blue", "comes in a box", "has two buttons", "weighs a kilo"],
}
THINGS = ["The blender", "This hotel", "The movie", "My new phone", "The delivery", "This book", "The lamp"]


def sentiment_rows(n: int, seed: int, *, rejected: bool = False) -> list[dict]:
    """Reviews and their label; with ``rejected``, a wrong label as each row's rejected answer (DPO)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        label = rnd.choice(sorted(OPINIONS))
        review = f"{rnd.choice(THINGS)} {rnd.choice(OPINIONS[label])}."
        row = {
            "messages": [
                {"role": "system", "content": SENTIMENT_SYSTEM},
                {"role": "user", "content": review},
                {"role": "assistant", "content": label},
            ],
            "split": "TRAIN",
            "metadata": {},
        }
        if rejected:
            wrong = rnd.choice([other for other in sorted(OPINIONS) if other != label])
            row["rejected_message"] = {"role": "assistant", "content": wrong}
        out.append(row)
    return out


def quality(base: str, n_train: int, n_test: int, epochs: int, preference: bool = False) -> None:
    """Fine-tune ``base`` through the trainer's own run (``services.trainer.job.Run``) on a sentiment
    task (SFT, then DPO on wrong labels with ``preference``), then compare exact match of the base
    and the fine-tuned model on a held-out TEST split."""
    import asyncio

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.blobstore import FileBlobStore
    from services.common.events import TrainingHyperparameters, TrainingRequest
    from services.common.model_store import ensure_base_model
    from services.trainer.job import Run, read_events

    store = Path(os.environ.get("DISTILLERY_MODEL_STORE_DIR", ".distillery/models"))
    base_dir = ensure_base_model(base, store_dir=store)
    train, test = sentiment_rows(n_train, seed=1, rejected=preference), sentiment_rows(n_test, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        blobs = FileBlobStore(Path(tmp) / "blobs")
        data = b"".join(json.dumps(r).encode() + b"\n" for r in train)
        asyncio.run(blobs.put_bytes("snapshots/q/train.jsonl", data))
        request = TrainingRequest(
            request_id="q:1",
            job_id="quality",
            project_id="bench",
            model_slug="sentiment",
            base_model=base,
            snapshot_uri="snapshots/q/train.jsonl",
            hyperparameters=TrainingHyperparameters(
                num_epochs=epochs,
                batch_size="auto",
                seed=0,
                enable_preference_tuning=preference,
                preference_num_epochs=epochs,
            ),
            output_prefix="out",
        )
        started = time.perf_counter()
        status = Run(request, Path(tmp) / "work", blobs=blobs, store_dir=store).execute()
        if status != "succeeded":
            raise SystemExit(read_events(Path(tmp) / "work" / "events.jsonl")[-1])
        print(f"trained in {time.perf_counter() - started:.0f} s")
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

        def exact_match(m) -> float:  # type: ignore[no-untyped-def]
            hits = 0
            for row in test:
                prompt = tokenizer.apply_chat_template(
                    row["messages"][:-1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
                )
                with torch.no_grad():
                    out = m.generate(**prompt, max_new_tokens=4, do_sample=False)
                answer = tokenizer.decode(out[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
                hits += answer.strip().strip(".").lower() == row["messages"][-1]["content"]
            return hits / len(test)

        before = exact_match(model)
        tuned = PeftModel.from_pretrained(model, Path(tmp) / "work" / "final")
        after = exact_match(tuned)
    print(f"{base}: exact match on {n_test} held-out rows: base {before:.2f} -> fine-tuned {after:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", action="append", help="a built-in base or one in the model store; repeatable; default both"
    )
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per optimizer step, in both runs")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--quality", action="store_true", help="fine-tune on a sentiment task, exact match vs the base"
    )
    parser.add_argument("--preference", action="store_true", help="with --quality: SFT, then DPO")
    args = parser.parse_args()
    if args.quality:
        for base in args.base or BASES[1:]:
            quality(base, args.rows or 120, 30, args.epochs, args.preference)
        return
    if args.child:
        child(args.child, args.base[0], args.rows, args.epochs, args.batch)
        return
    summary = []
    for base in args.base or BASES:
        n = args.rows or DEFAULT_ROWS.get(base, 64)
        print(f"== {base}: {n} rows, {args.epochs} epoch(s), {args.batch} rows per step", flush=True)
        results = {}
        for which in ("ours", "trl"):
            r = measure(which, base, n, args.epochs, args.batch)
            results[which] = r
            print(
                f"{which:>4}: {r['tokens_per_second']:8.1f} tokens/s  wall {r['wall']:6.1f} s  "
                f"{r['tokens_per_cpu_second']:7.1f} tokens/CPU-s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB  final loss {r['final_loss']:.3f} "
                f"(last steps {r['last_steps_loss']:.3f})",
                flush=True,
            )
        ours, trl = results["ours"], results["trl"]
        cpu_ratio = ours["tokens_per_cpu_second"] / trl["tokens_per_cpu_second"]
        summary.append(f"{base}: tokens per CPU-second vs plain trl: {cpu_ratio:.2f}x (robust to a busy box)")
        summary.append(
            f"{base}: sft tokens/s vs plain trl: {ours['tokens_per_second'] / trl['tokens_per_second']:.2f}x "
            f"(ours {ours['tokens_per_second']:.0f}, trl {trl['tokens_per_second']:.0f}, "
            f"final loss {ours['final_loss']:.3f} vs {trl['final_loss']:.3f})"
        )
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
