"""Supervised fine-tuning of a LoRA adapter: batches sized by tokens, loss on assistant tokens only.

What differs from TRL's ``SFTTrainer`` with its defaults (``bench/train.py`` measures it): rows are
tokenized once with the base's chat template and activations are kept (no gradient checkpointing).
Steps hold the same randomly drawn rows as TRL's; on CPU a step runs as micro-batches of rows of
similar length (``length_groups``), whose gradients add up to the whole step's, so a short row is
not padded to the step's longest; on a GPU a step's rows are concatenated into one padding-free
sequence with restarting position ids (exact: attention stays within each row). Flattening does not
pay on CPU: attention over one long sequence costs more there than over a padded batch of short
ones. (Sorting rows by length across the dataset pads even less, but changes which rows train
together, and ended at a slightly higher loss than TRL's random steps.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

from services.common.precision import prefer_bf16
from services.trainer.data import IGNORE

# Tokens one optimizer step should see when batch_size is "auto" (CPU; a GPU pod can afford more).
CPU_TOKEN_BUDGET = 4096
GPU_TOKEN_BUDGET = 32768
# A forward and backward pass costs about this many tokens' work on top of its tokens: a micro-batch
# is split off only where it saves more padding than that.
MICRO_BATCH_OVERHEAD_TOKENS = 64
LORA_RANK = 16
LORA_ALPHA = 32
SFT_LEARNING_RATE = 2e-4
DPO_LEARNING_RATE = 2e-5


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.05,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def use_bf16(model: Any) -> bool:
    """bf16 autocast pays from SmolLM2's size up (~1.35x over fp32 on a CPU with native bf16); on a
    model as small as tiny-chat (hidden 128) the casts cost more than they save (~1.3x more CPU)."""
    return prefer_bf16(int(getattr(model.config, "hidden_size", 0) or 0))


def token_budget() -> int:
    return GPU_TOKEN_BUDGET if torch.cuda.is_available() else CPU_TOKEN_BUDGET


def training_arguments(
    output_dir: Path,
    *,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    save_steps: int,
    seed: int,
    max_steps: int = -1,
    bf16: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments shared by our SFT and DPO runs (``TrainingArguments`` or TRL's configs)."""
    cpu = not torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        report_to=[],
        seed=seed,
        data_seed=seed,
        # TRL's configs need use_cpu on CPU (they default to bf16, which needs it there).
        use_cpu=cpu,
        bf16=bf16,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        **extra,
    )


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices in micro-batches of similar length that minimise padded tokens plus
    ``MICRO_BATCH_OVERHEAD_TOKENS`` per micro-batch (contiguous runs of the rows sorted by length)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    # best[j]: cheapest cost of the first j sorted rows; cut[j]: where its last micro-batch starts
    best, cut = [0] + [0] * len(sizes), [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        best[j], cut[j] = min(
            (best[i] + (j - i) * sizes[j - 1] + MICRO_BATCH_OVERHEAD_TOKENS, i) for i in range(j)
        )
    groups, j = [], len(sizes)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


class TokenCountingTrainer(Trainer):
    """A ``Trainer`` that also measures mean token accuracy and tokens seen (for the metrics events).

    Evaluation (a validation file, ``eval_dataset``) is counted apart from training: its loss is the
    mean over every assistant token of the validation set (``eval_loss``, not the trainer's mean of
    per-batch means) and its accuracy is ``eval_mean_token_accuracy``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self._correct = 0
        self._counted = 0
        self._eval_loss = 0.0
        self._eval_correct = 0
        self._eval_counted = 0

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        """A padded step as micro-batches of similar lengths, one backward each: the loss is
        normalised by the whole step's label count, so their gradients sum to the step's."""
        mask = inputs.get("attention_mask")
        groups = length_groups(mask.sum(-1).tolist()) if mask is not None else []
        if len(groups) < 2 or num_items_in_batch is None:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        for rows in groups:
            index = torch.tensor(rows, device=mask.device)
            width = int(mask.index_select(0, index).sum(-1).max())
            part = {key: value.index_select(0, index)[:, :width] for key, value in inputs.items()}
            loss = super().training_step(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        labels = inputs["labels"]
        with torch.no_grad():
            logits = outputs.logits[..., :-1, :]
            target = labels[..., 1:]
            mask = target != IGNORE
            correct = int((logits.argmax(-1)[mask] == target[mask]).sum())
            if model.training:
                attention = inputs.get("attention_mask")
                self.tokens_seen += (
                    int(attention.sum()) if attention is not None else int(inputs["input_ids"].numel())
                )
                self._correct += correct
                self._counted += int(mask.sum())
            else:
                self._eval_loss += float(
                    torch.nn.functional.cross_entropy(logits[mask].float(), target[mask], reduction="sum")
                )
                self._eval_correct += correct
                self._eval_counted += int(mask.sum())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._eval_loss, self._eval_correct, self._eval_counted = 0.0, 0, 0
        # A data loader draws its seed from the global RNG: restored after, so training (dropout,
        # shuffling) goes on exactly as it would without a validation file.
        with torch.random.fork_rng():
            output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if self._eval_counted:
            output.metrics[f"{prefix}_loss"] = self._eval_loss / self._eval_counted
            output.metrics[f"{prefix}_mean_token_accuracy"] = self._eval_correct / self._eval_counted
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._counted:
            logs["mean_token_accuracy"] = self._correct / self._counted
            self._correct = self._counted = 0
        super().log(logs, start_time)


class Progress(TrainerCallback):
    """Turns the trainer's logs and saves into job events, and obeys pause/cancel between steps.

    ``on_metrics(data)`` and ``on_checkpoint(step, folder, data)`` are called in the training
    process; ``control_state()`` returns ``"pause"``, ``"cancel"`` or ``None``.
    """

    def __init__(
        self,
        *,
        phase: str,
        on_metrics: Callable[[dict[str, Any]], None],
        on_checkpoint: Callable[[int, Path, dict[str, Any]], None],
        control_state: Callable[[], str | None],
        tokens_seen: Callable[[], int],
        epochs: int,
        batch_size: int | None = None,
    ) -> None:
        self.phase = phase
        self.batch_size = batch_size
        self.on_metrics = on_metrics
        self.on_checkpoint = on_checkpoint
        self.control_state = control_state
        self.tokens_seen = tokens_seen
        self.epochs = epochs
        self.stopped: str | None = None
        self.losses: list[tuple[int, float]] = []
        self.last: dict[str, Any] = {}
        self._started = time.monotonic()
        self._tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._started = time.monotonic()
        self._tokens_at_start = self.tokens_seen()
        # Resumed from a checkpoint: its log history keeps the loss curve whole.
        self.losses = [
            (e["step"], float(e["loss"])) for e in state.log_history if "loss" in e and "step" in e
        ]

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        wanted = self.control_state()
        if wanted in ("pause", "cancel"):
            self.stopped = wanted
            control.should_training_stop = True
            control.should_save = wanted == "pause"  # a paused run resumes from this step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        logs = logs or {}
        if "loss" not in logs:
            return
        elapsed = max(time.monotonic() - self._started, 1e-6)
        tokens = self.tokens_seen() - self._tokens_at_start
        done_steps = max(state.global_step, 1)
        rate = tokens / elapsed if tokens else None
        data = {
            "phase": self.phase,
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(float(state.epoch or 0), 4),
            "num_epochs": self.epochs,
            "batch_size": self.batch_size,
            "train_loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "tokens_per_second": round(rate, 1) if rate else None,
            "eta_seconds": round(elapsed / done_steps * max(state.max_steps - state.global_step, 0), 1),
        }
        if "mean_token_accuracy" in logs:
            data["train_mean_token_accuracy"] = float(logs["mean_token_accuracy"])
        for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            if key in logs:
                data[key.replace("/", "_")] = float(logs[key])
        self.losses.append((state.global_step, float(logs["loss"])))
        self.last = data
        self.on_metrics(data)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        # The validation set, whole, at a checkpoint's step (just before its save) or at the end.
        metrics = metrics or {}
        if "eval_loss" not in metrics:
            return
        valid = {"full_valid_loss": float(metrics["eval_loss"])}
        if "eval_mean_token_accuracy" in metrics:
            valid["full_valid_mean_token_accuracy"] = float(metrics["eval_mean_token_accuracy"])
        # Kept with the step's training metrics: the checkpoint saved next reports both.
        self.last = {**self.last, "phase": self.phase, "step": state.global_step, **valid}
        self.on_metrics(dict(self.last))

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.on_checkpoint(state.global_step, folder, dict(self.last))


def flatten_collator() -> DataCollatorWithFlattening:
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)


class PadCollator:
    """Right-pads a batch to its longest row; padded labels are ignored by the loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for feature in features:
            pad = longest - len(feature["input_ids"])
            ids.append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(feature["labels"]) + [IGNORE] * pad)
            mask.append([1] * len(feature["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }


def collator_for(tokenizer: Any) -> Any:
    return flatten_collator() if torch.cuda.is_available() else PadCollator(tokenizer.pad_token_id)


def sft_trainer(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    args: dict[str, Any],
    progress: Progress,
    validation: Any = None,
) -> TokenCountingTrainer:
    """The SFT trainer; with a ``validation`` dataset it is evaluated whole at every checkpoint's
    step and at the end (none: no evaluation at all)."""
    # Steps draw rows at random, as TRL does; on CPU training_step splits each into similar lengths.
    evaluation: dict[str, Any] = {"eval_strategy": "no"}
    if validation is not None:
        evaluation = {
            "eval_strategy": "steps",
            "eval_steps": args["save_steps"],
            "per_device_eval_batch_size": args["per_device_train_batch_size"],
        }
    trainer = TokenCountingTrainer(
        model=model,
        args=TrainingArguments(**{**evaluation, **args}),
        train_dataset=dataset,
        eval_dataset=validation,
        data_collator=collator_for(tokenizer),
        processing_class=tokenizer,
        callbacks=[progress],
    )
    progress.tokens_seen = lambda: trainer.tokens_seen
    return trainer


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder the trainer left, if any."""
    found = []
    for folder in output_dir.glob("checkpoint-*"):
        step = folder.name.rpartition("-")[2]
        if step.isdigit() and (folder / "trainer_state.json").exists():
            found.append((int(step), folder))
    return max(found)[1] if found else None
