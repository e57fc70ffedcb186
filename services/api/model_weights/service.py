"""Exporting a fine-tuned model's weights: the LoRA adapter as trained, or merged into its base in
the base's dtype — either way a tar of safetensors, config and tokenizer files, with a model card
(``README.md``, and ``distillery_model.json`` for machines).

The tar is streamed as it is produced (headers written by hand, files read in chunks), so a
multi-gigabyte merged model never sits in memory; the merge itself runs in a worker thread into a
scratch folder that is removed when the download ends.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from services.api.fine_tuning import service as fine_tuning
from services.api.fine_tuning.models import FineTunedModel, TrainingJob
from services.common.blobstore import BlobStore
from services.common.clock import iso
from services.common.errors import APIError, not_found
from services.common.model_store import ModelNotFound, ensure_base_model

Format = Literal["adapter", "merged"]
CHUNK = 1 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass
class Export:
    """A model's weights, ready to stream: the files (name -> local path) and where they live."""

    slug: str
    format: Format
    files: dict[str, Path]
    scratch: Path

    @property
    def filename(self) -> str:
        return f"{self.slug}-{self.format}.tar"


def conflict(message: str) -> APIError:
    return APIError(409, message, param="slug", code="model_not_trained")


async def load_exportable(
    *, session: AsyncSession, project_id: str, slug: str
) -> tuple[FineTunedModel, TrainingJob | None]:
    model = await fine_tuning.find_model(session=session, project_id=project_id, slug=slug)
    if model is None:
        raise not_found(f"No model with slug {slug!r} in this project.", param="slug")
    if model.provider != "openpipe":
        raise APIError(
            400,
            f"Model {slug!r} was fine-tuned by OpenAI: its weights stay with OpenAI and cannot be exported.",
            param="slug",
            code="weights_unavailable",
        )
    if not model.adapter_uri:
        raise conflict(f"Model {slug!r} is {model.status}: it has no trained weights to export yet.")
    job = await session.get(TrainingJob, model.job_id) if model.job_id else None
    return model, job


def model_card(model: FineTunedModel, job: TrainingJob | None, format: Format) -> dict[str, Any]:
    base = job.base_model if job is not None else model.base_model
    progress = (job.progress or {}) if job is not None else {}
    metrics = {k: v for k, v in progress.items() if isinstance(v, int | float) and k != "updated_at"}
    return {
        "slug": model.slug,
        "format": format,
        "base_model": base,
        "hyperparameters": model.hyperparameters,
        "dataset_id": model.dataset_id,
        "dataset_snapshot": job.snapshot_uri if job is not None else None,
        "pruning_rules": list(model.pruning_rules or []),
        "trained_tokens": model.trained_tokens,
        "metrics": metrics,
        "job_id": model.job_id,
        "created": iso(model.created_at),
        "exported_at": int(time.time()),
    }


def card_markdown(card: dict[str, Any]) -> str:
    library = "peft" if card["format"] == "adapter" else "transformers"
    how = (
        "A LoRA adapter: load the base, then `PeftModel.from_pretrained(base, this_folder)`."
        if card["format"] == "adapter"
        else "The adapter merged into the base: `AutoModelForCausalLM.from_pretrained(this_folder)`."
    )
    lines = [
        "---",
        f"base_model: {card['base_model']}",
        f"library_name: {library}",
        "tags: [distillery, fine-tuned]",
        "---",
        f"# {card['slug']}",
        "",
        f"Fine-tuned by Distillery from `{card['base_model']}`. {how}",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | `{card['dataset_id']}` (snapshot `{card['dataset_snapshot']}`) |",
        f"| trained tokens | {card['trained_tokens']} |",
        f"| hyperparameters | `{json.dumps(card['hyperparameters'], sort_keys=True)}` |",
        f"| metrics | `{json.dumps(card['metrics'], sort_keys=True)}` |",
        f"| pruning rules | {len(card['pruning_rules'])} (remove their text from prompts before calling) |",
        "",
    ]
    return "\n".join(lines)


async def _download_adapter(blobs: BlobStore, adapter_uri: str, folder: Path) -> None:
    prefix = adapter_uri.strip("/") + "/"
    keys = await blobs.list(prefix)
    if prefix + "adapter_config.json" not in keys:
        raise APIError(
            410,
            f"The adapter of this model is missing from the blob store (expected under {prefix!r}).",
            type="server_error",
            code="weights_missing",
        )
    for key in keys:
        await blobs.download_file(key, folder / key[len(prefix) :])


def _merge(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None) or torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, out / name)


async def prepare_export(
    *,
    model: FineTunedModel,
    job: TrainingJob | None,
    format: Format,
    blobs: BlobStore,
    store_dir: Path,
) -> Export:
    scratch = Path(tempfile.mkdtemp(prefix="distillery-weights-"))
    try:
        adapter_dir = scratch / "adapter"
        await _download_adapter(blobs, model.adapter_uri or "", adapter_dir)
        out = adapter_dir
        card = model_card(model, job, format)
        if format == "merged":
            try:
                base_dir = await asyncio.to_thread(
                    ensure_base_model, card["base_model"], store_dir=store_dir, blobs=blobs
                )
            except (ModelNotFound, ValueError) as exc:
                raise APIError(
                    410,
                    f"The base model cannot be loaded: {exc}",
                    type="server_error",
                    code="weights_missing",
                ) from None
            out = scratch / "merged"
            await asyncio.to_thread(_merge, adapter_dir, base_dir, out)
        (out / "README.md").write_text(card_markdown(card))
        (out / "distillery_model.json").write_text(json.dumps(card, indent=2))
        files = {p.name: p for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}
        return Export(model.slug, format, files, scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


async def stream_tar(export: Export) -> AsyncIterator[bytes]:
    """The files as an uncompressed tar, one chunk at a time; the scratch folder goes at the end."""
    try:
        for name, path in export.files.items():
            info = tarfile.TarInfo(f"{export.slug}/{name}")
            info.size = path.stat().st_size
            info.mtime = int(path.stat().st_mtime)
            info.mode = 0o644
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            handle = await asyncio.to_thread(open, path, "rb")
            try:
                while chunk := await asyncio.to_thread(handle.read, CHUNK):
                    yield chunk
            finally:
                handle.close()
            if info.size % tarfile.BLOCKSIZE:
                yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
        yield b"\0" * (tarfile.BLOCKSIZE * 2)
    finally:
        shutil.rmtree(export.scratch, ignore_errors=True)
