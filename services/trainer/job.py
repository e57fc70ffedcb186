"""One training run, start to finish, in the process that trains (a child process or a Kubernetes pod).

The run reads the dataset snapshot, makes sure the base model is on disk, trains SFT and/or DPO,
uploads checkpoints, the final adapter and the loss curve under ``output_prefix``, and reports
through ``events.jsonl`` in its work folder: one JSON object a line, appended and fsynced. The line
number is the event's sequence number, so whoever relays the file to Kafka produces stable event
ids. The work folder also holds the trainer's checkpoints, so a run started again resumes from its
last one; ``control`` (a file the service writes) asks for ``pause`` or ``cancel`` between steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from services.common.blobstore import BlobNotFound, BlobStore
from services.common.events import TrainingHyperparameters, TrainingRequest
from services.common.model_store import ModelNotFound, _run_async, ensure_base_model
from services.trainer.data import DataError, TrainingRows, auto_batch_size, default_epochs, parse_snapshot

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
CONTROL_FILE = "control"
REQUEST_FILE = "request.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
CHECKPOINTS_PER_PHASE = 4


class RunStopped(Exception):
    """The run ended early on request (pause or cancel); ``status`` says which."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def clock_seq() -> int:
    """A sequence number from the wall clock (µs): used where two writers report on one job."""
    return time.time_ns() // 1000


class EventLog:
    """Appends events to ``events.jsonl``; the line number is the sequence number.

    With ``clock_seq=True`` (Kubernetes pods, whose service also reports on the job) each line
    carries its own ``seq`` from the clock instead, fixed when written so relaying it again
    gives the same event id.
    """

    def __init__(self, path: Path, *, clock_seq: bool = False) -> None:
        self.path = path
        self.clock_seq = clock_seq
        self._last = 0

    def emit(self, type: str, message: str = "", **fields: Any) -> None:
        event = {"type": type, "message": message, "created_at": int(time.time()), **fields}
        if self.clock_seq:
            self._last = max(self._last + 1, clock_seq())
            event["seq"] = self._last
        line = json.dumps({k: v for k, v in event.items() if v is not None}, default=str)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())


def read_events(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """Complete event lines from line ``start`` on (a line still being written is left for later)."""
    if not path.exists():
        return []
    events = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number < start:
                continue
            if not line.endswith("\n"):
                break
            events.append(json.loads(line))
    return events


def control_state(work_dir: Path) -> str | None:
    try:
        return (work_dir / CONTROL_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


class Run:
    """Everything one run needs: its request, work folder, blob store and model cache."""

    def __init__(
        self,
        request: TrainingRequest,
        work_dir: Path,
        *,
        blobs: BlobStore,
        store_dir: Path,
        clock_seq: bool = False,
        max_steps: int = 0,
    ) -> None:
        self.request = request
        self.max_steps = max_steps
        self.hyper: TrainingHyperparameters = request.hyperparameters
        self.work_dir = work_dir
        self.blobs = blobs
        self.store_dir = store_dir
        self.events = EventLog(work_dir / EVENTS_FILE, clock_seq=clock_seq)
        self.prefix = (
            request.output_prefix or f"fine-tunes/{request.project_id}/{request.model_slug}/{request.job_id}"
        ).rstrip("/")
        self.losses: list[tuple[str, int, float]] = []
        self.trained_tokens = 0

    # --- the whole run ---------------------------------------------------------------------

    def execute(self) -> str:
        """Train and report; returns the final status. Never raises for a bad dataset or model."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        resumed = (self.work_dir / "sft").exists() or (self.work_dir / "dpo").exists()
        self.events.emit(
            "status",
            ("Resuming training" if resumed else "Training started") + f" on {self.request.base_model}.",
            status="running",
        )
        try:
            final = self._train()
        except RunStopped as stop:
            message = "Training paused; resume continues from the last checkpoint."
            if stop.status == "cancelled":
                message = "Training cancelled."
            self.events.emit("status", message, status=stop.status)
            return stop.status
        except DataError as exc:
            return self._fail(str(exc), exc.code)
        except ModelNotFound as exc:
            return self._fail(str(exc), "base_model_unavailable")
        except BlobNotFound as exc:
            return self._fail(f"A training input is missing from the blob store: {exc.key}", "missing_input")
        except Exception as exc:
            log.exception("training run %s failed", self.request.job_id)
            return self._fail(f"Training failed: {type(exc).__name__}: {exc}", "training_failed")
        self.events.emit(
            "status",
            f"Training succeeded: {self.trained_tokens} trained tokens; adapter at {final}.",
            status="succeeded",
            artifact_uri=final,
            trained_tokens=self.trained_tokens,
            data={"loss_curve_uri": f"{self.prefix}/loss_curve.png", "adapter_uri": final},
        )
        return "succeeded"

    def _fail(self, message: str, code: str) -> str:
        self.events.emit("status", message, status="failed", level="error", error_code=code)
        return "failed"

    def _train(self) -> str:
        import torch

        rows = self._rows()
        validation = self._validation_rows()
        base_dir = ensure_base_model(self.request.base_model, store_dir=self.store_dir, blobs=self.blobs)
        seed = self.hyper.seed if self.hyper.seed is not None else 42
        torch.manual_seed(seed)
        model, tokenizer = self._load(base_dir)
        if self.hyper.enable_sft:
            model = self._sft(model, tokenizer, rows, seed, validation)
        if self.hyper.enable_preference_tuning:
            model = self._dpo(model, tokenizer, rows, seed)
        final_dir = self.work_dir / "final"
        shutil.rmtree(final_dir, ignore_errors=True)
        save_active_adapter(model, final_dir)
        tokenizer.save_pretrained(final_dir)
        self._write_adapter_metadata(final_dir)
        key = f"{self.prefix}/adapter"
        self._upload(final_dir, key)
        self._upload_loss_curve()
        return key

    def _rows(self) -> TrainingRows:
        if not self.request.snapshot_uri:
            raise DataError("The training request names no dataset snapshot.", "missing_input")
        data = _run_async(self.blobs.get_bytes(self.request.snapshot_uri))
        rows = parse_snapshot(data, self.request.pruning_rules)
        if rows.total == 0:
            raise DataError("The dataset is empty: there is nothing to train on.", "empty_dataset")
        if not rows.sft:
            raise DataError(
                f"None of the dataset's {rows.total} rows has an assistant output in the TRAIN split "
                "to learn from.",
                "no_assistant_outputs",
            )
        if not self.hyper.enable_sft and not self.hyper.enable_preference_tuning:
            raise DataError(
                "Both SFT and preference tuning are disabled: nothing to train.", "nothing_to_train"
            )
        if self.hyper.enable_preference_tuning and not rows.dpo:
            raise DataError(
                "Preference tuning (DPO) needs rows with a rejected_message; this dataset has none.",
                "no_preference_rows",
            )
        self.events.emit(
            "message",
            f"Loaded {len(rows.sft)} training rows ({len(rows.dpo)} with a rejected output, "
            f"{rows.total - len(rows.sft)} skipped).",
        )
        return rows

    def _validation_rows(self) -> list[dict[str, Any]]:
        """The validation file's rows (all of them, whatever their split), or none without one."""
        key = self.request.validation_snapshot_uri
        if not key:
            return []
        if not self.hyper.enable_sft:
            # Validation metrics are SFT's (loss and token accuracy on the assistant outputs); a
            # DPO-only run has no SFT phase to evaluate, so it does not read the file at all.
            self.events.emit(
                "message", "The validation file is evaluated during SFT only; this run has none."
            )
            return []
        rows = parse_snapshot(
            _run_async(self.blobs.get_bytes(key)), self.request.pruning_rules, every_split=True
        )
        if not rows.sft:
            raise DataError(
                f"None of the validation file's {rows.total} rows has an assistant output to evaluate on.",
                "no_validation_outputs",
            )
        self.events.emit(
            "message", f"Loaded {len(rows.sft)} validation rows ({rows.total - len(rows.sft)} skipped)."
        )
        return rows.sft

    def _load(self, base_dir: Path) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.config.use_cache = False
        return model, tokenizer

    def _start_adapter(self, model: Any) -> Any:
        """A fresh LoRA adapter, or the parent model's adapter to continue training from."""
        from peft import PeftModel, get_peft_model

        from services.trainer.sft import lora_config

        if not self.request.parent_adapter_uri:
            return get_peft_model(model, lora_config())
        folder = self.work_dir / "parent_adapter"
        self._download(self.request.parent_adapter_uri, folder)
        self.events.emit("message", f"Continuing from the adapter at {self.request.parent_adapter_uri}.")
        return PeftModel.from_pretrained(model, folder, is_trainable=True)

    # --- SFT -------------------------------------------------------------------------------

    def _sft(
        self, model: Any, tokenizer: Any, rows: TrainingRows, seed: int, validation: list[dict[str, Any]]
    ) -> Any:
        from datasets import Dataset
        from peft import PeftModel

        from services.trainer.data import tokenize_sft
        from services.trainer.sft import (
            SFT_LEARNING_RATE,
            latest_checkpoint,
            sft_trainer,
            token_budget,
            training_arguments,
            use_bf16,
        )

        done = self.work_dir / "sft" / "final"
        if (done / "adapter_config.json").exists():
            self.trained_tokens = int((done / "trained_tokens").read_text())
            # The loss curve still needs the SFT steps, which this process did not see.
            losses = done / "losses.json"
            if losses.exists():
                self.losses.extend(("sft", step, loss) for step, loss in json.loads(losses.read_text()))
            self.events.emit("message", "SFT finished before the restart; continuing with what follows it.")
            return PeftModel.from_pretrained(model, done, is_trainable=True)
        model = self._start_adapter(model)
        max_length = min(int(getattr(tokenizer, "model_max_length", 2048) or 2048), 4096)
        tokenized = [tokenize_sft(tokenizer, row, max_length) for row in rows.sft]
        tokenized = [t for t in tokenized if any(label != -100 for label in t["labels"])]
        if not tokenized:
            raise DataError("Every assistant output was cut off by the length limit.", "no_assistant_outputs")
        valid = [tokenize_sft(tokenizer, row, max_length) for row in validation]
        valid = [t for t in valid if any(label != -100 for label in t["labels"])]
        if validation and not valid:
            raise DataError(
                "Every assistant output of the validation file was cut off by the length limit.",
                "no_validation_outputs",
            )
        valid.sort(key=lambda t: len(t["input_ids"]))  # similar lengths in a batch: little padding
        lengths = [len(t["input_ids"]) for t in tokenized]
        epochs = self.hyper.num_epochs or default_epochs(len(tokenized))
        batch = self.hyper.batch_size
        if batch == "auto":
            batch = auto_batch_size(lengths, token_budget())
        steps = math.ceil(len(tokenized) / batch) * epochs
        if self.max_steps:
            steps = min(steps, self.max_steps)
        self.events.emit(
            "message",
            f"SFT: {len(tokenized)} rows, {sum(lengths)} tokens, {epochs} epochs, batch size {batch}, "
            f"{steps} steps.",
            data={"num_epochs": epochs, "batch_size": batch, "total_steps": steps},
        )
        output_dir = self.work_dir / "sft"
        args = training_arguments(
            output_dir,
            learning_rate=SFT_LEARNING_RATE * self.hyper.learning_rate_multiplier,
            epochs=epochs,
            batch_size=batch,
            save_steps=max(1, math.ceil(steps / CHECKPOINTS_PER_PHASE)),
            seed=seed,
            max_steps=self.max_steps or -1,
            bf16=use_bf16(model),
        )
        progress = self._progress("sft", epochs, batch)
        trainer = sft_trainer(
            model,
            tokenizer,
            Dataset.from_list(tokenized),
            args,
            progress,
            validation=Dataset.from_list(valid) if valid else None,
        )
        trainer.train(resume_from_checkpoint=str(latest_checkpoint(output_dir) or "") or None)
        self._collect(progress)
        model = trainer.model
        self.trained_tokens += sum(lengths) * epochs
        # adapter_config.json marks SFT done, so what a restart reads along with it is written first.
        done.mkdir(parents=True, exist_ok=True)
        (done / "losses.json").write_text(json.dumps(progress.losses))
        (done / "trained_tokens").write_text(str(self.trained_tokens))
        model.save_pretrained(done, safe_serialization=True)
        return model

    # --- DPO -------------------------------------------------------------------------------

    def _dpo(self, model: Any, tokenizer: Any, rows: TrainingRows, seed: int) -> Any:
        from datasets import Dataset
        from peft import PeftModel
        from trl import DPOConfig, DPOTrainer

        from services.trainer.sft import (
            DPO_LEARNING_RATE,
            latest_checkpoint,
            token_budget,
            training_arguments,
            use_bf16,
        )

        if not isinstance(model, PeftModel):
            # DPO alone: from a parent adapter or a fresh one (reference: the base, adapter disabled).
            model = self._start_adapter(model)
        # With an SFT adapter TRL copies it into a frozen "ref" adapter: the reference is the SFT model.
        dataset = Dataset.from_list([{k: v for k, v in row.items() if k != "tools"} for row in rows.dpo])
        epochs = self.hyper.preference_num_epochs or min(3, default_epochs(len(rows.dpo)))
        batch = self.hyper.batch_size
        if batch == "auto":
            batch = max(1, min(8, auto_batch_size([512] * len(rows.dpo), token_budget())))
        steps = math.ceil(len(rows.dpo) / batch) * epochs
        if self.max_steps:
            steps = min(steps, self.max_steps)
        self.events.emit(
            "message",
            f"DPO: {len(rows.dpo)} preference rows, {epochs} epochs, batch size {batch}, {steps} steps, "
            f"beta {self.hyper.training_beta}.",
        )
        output_dir = self.work_dir / "dpo"
        args = training_arguments(
            output_dir,
            learning_rate=DPO_LEARNING_RATE * self.hyper.preference_learning_rate_multiplier,
            epochs=epochs,
            batch_size=batch,
            save_steps=max(1, math.ceil(steps / CHECKPOINTS_PER_PHASE)),
            seed=seed,
            max_steps=self.max_steps or -1,
            bf16=use_bf16(model),
            beta=self.hyper.training_beta,
            max_length=1024,
        )
        progress = self._progress("dpo", epochs, batch)
        trainer = DPOTrainer(
            model=model, args=DPOConfig(**args), train_dataset=dataset, processing_class=tokenizer
        )
        trainer.add_callback(progress)
        progress.tokens_seen = lambda: 0
        trainer.train(resume_from_checkpoint=str(latest_checkpoint(output_dir) or "") or None)
        self._collect(progress)
        model = trainer.model
        if self.hyper.adapter_weight != 1:
            rank = weigh_preference_adapter(model, self.hyper.adapter_weight)
            self.events.emit(
                "message",
                f"Adapter weight {self.hyper.adapter_weight:g} applied: the final adapter is the reference "
                f"plus {self.hyper.adapter_weight:g} x what DPO changed (LoRA rank {rank}).",
                data={"adapter_weight": self.hyper.adapter_weight, "lora_rank": rank},
            )
        elif "ref" in getattr(model, "peft_config", {}):
            model.delete_adapter("ref")
        self.trained_tokens += sum(_dpo_tokens(tokenizer, row) for row in rows.dpo) * epochs
        return model

    # --- reporting -------------------------------------------------------------------------

    def _progress(self, phase: str, epochs: int, batch_size: int) -> Any:
        from services.trainer.sft import Progress

        return Progress(
            phase=phase,
            batch_size=batch_size,
            on_metrics=lambda data: self.events.emit("metrics", data=data),
            on_checkpoint=lambda step, folder, data: self._checkpoint(phase, step, folder, data),
            control_state=lambda: control_state(self.work_dir),
            tokens_seen=lambda: 0,
            epochs=epochs,
        )

    def _collect(self, progress: Any) -> None:
        self.losses.extend((progress.phase, step, loss) for step, loss in progress.losses)
        if progress.stopped == "pause":
            raise RunStopped("paused")
        if progress.stopped == "cancel":
            raise RunStopped("cancelled")

    def _checkpoint(self, phase: str, step: int, folder: Path, data: dict[str, Any]) -> None:
        key = f"{self.prefix}/checkpoints/{phase}-step-{step:06d}"
        self._upload(folder, key)
        self.events.emit(
            "checkpoint",
            f"Checkpoint saved at {phase.upper()} step {step}.",
            artifact_uri=key,
            data={**{k: v for k, v in data.items() if k != "phase"}, "step": step, "phase": phase},
        )

    def _write_adapter_metadata(self, folder: Path) -> None:
        meta = {
            "base_model": self.request.base_model,
            "adapter_weight": self.hyper.adapter_weight,
            "job_id": self.request.job_id,
            "model_slug": self.request.model_slug,
            "trained_tokens": self.trained_tokens,
        }
        (folder / "distillery_adapter.json").write_text(json.dumps(meta, indent=2))

    def _upload(self, folder: Path, key: str) -> None:
        names = ADAPTER_FILES + TOKENIZER_FILES + ("distillery_adapter.json",)
        files = [folder / name for name in names if (folder / name).is_file()]

        async def put_all() -> None:
            for path in files:
                if path.name == "adapter_config.json":
                    # Name the base as the model store knows it, not by this machine's cache path.
                    config = json.loads(path.read_text())
                    config["base_model_name_or_path"] = self.request.base_model
                    await self.blobs.put_bytes(f"{key}/{path.name}", json.dumps(config, indent=2).encode())
                else:
                    await self.blobs.put_file(f"{key}/{path.name}", path)

        _run_async(put_all())

    def _download(self, key: str, folder: Path) -> None:
        prefix = key.rstrip("/") + "/"

        async def get_all() -> None:
            keys = await self.blobs.list(prefix)
            if not keys:
                raise BlobNotFound(prefix)
            for name in keys:
                await self.blobs.download_file(name, folder / name[len(prefix) :])

        _run_async(get_all())

    def _upload_loss_curve(self) -> None:
        if not self.losses:
            return
        path = self.work_dir / "loss_curve.png"
        plot_losses(self.losses, path, title=f"{self.request.model_slug} ({self.request.base_model})")
        _run_async(self.blobs.put_file(f"{self.prefix}/loss_curve.png", path, content_type="image/png"))


WEIGHTED_ADAPTER = "weighted"


def weigh_preference_adapter(model: Any, weight: float) -> int:
    """Make the DPO-trained PeftModel's adapter ΔW_ref + weight·(ΔW_dpo − ΔW_ref); returns its rank.

    ``default`` is the adapter DPO trained; ``ref`` is TRL's frozen copy of the adapter DPO started
    from (the SFT or parent adapter; a fresh adapter's ΔW is 0, so then the reference is the base).
    peft's ``cat`` combination is exact for LoRA: it stacks weight·scaling·A of each adapter over
    their B's, with rank the sum of the ranks and scaling 1. The combined adapter replaces both and
    is the active one (``save_active_adapter`` writes it as the adapter).
    """
    adapters, weights = ["default"], [weight]
    if "ref" in model.peft_config:
        adapters.append("ref")
        weights.append(1.0 - weight)
    model.add_weighted_adapter(adapters, weights, WEIGHTED_ADAPTER, combination_type="cat")
    model.set_adapter(WEIGHTED_ADAPTER)
    for name in adapters:
        model.delete_adapter(name)
    return int(model.peft_config[WEIGHTED_ADAPTER].r)


def save_active_adapter(model: Any, folder: Path) -> None:
    """Save the model's active adapter as the folder's adapter (peft puts any adapter not named
    ``default`` in a subfolder of its name; servers load the folder itself)."""
    name = model.active_adapter
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=[name])
    if name != "default":
        for path in (folder / name).iterdir():
            path.replace(folder / path.name)
        (folder / name).rmdir()


def _dpo_tokens(tokenizer: Any, row: dict[str, Any]) -> int:
    text = "".join(str(m.get("content") or "") for m in [*row["prompt"], *row["chosen"], *row["rejected"]])
    return len(tokenizer(text)["input_ids"])


def plot_losses(losses: list[tuple[str, int, float]], path: Path, *, title: str) -> None:
    """Save the training loss per step (one line per phase) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for phase in dict.fromkeys(p for p, _, _ in losses):
        points = [(s, v) for p, s, v in losses if p == phase]
        axes.plot([s for s, _ in points], [v for _, v in points], label=phase.upper(), marker=".")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
