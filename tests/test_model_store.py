"""The model store: built-in bases built offline and deterministically, other names only from blobs."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from services.common.blobstore import BlobStore, FileBlobStore, blob_store_from_url
from services.common.model_store import (
    TINY_CHAT,
    ModelNotFound,
    ensure_base_model,
    local_model_dir,
    upload_model,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_base_model(TINY_CHAT, store_dir=tmp_path_factory.mktemp("models"))


def test_tiny_chat_is_a_loadable_hf_model(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tiny.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    out = model.generate(
        **tokenizer.apply_chat_template(
            MESSAGES[:2], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ),
        max_new_tokens=3,
        do_sample=False,
    )
    assert out.shape[1] > 0


def test_chat_template_renders_tools_and_marks_only_assistant_turns(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    assert '<tools>\n{"type": "function"' in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>\n" in text
    encoded = tokenizer.apply_chat_template(
        MESSAGES, tools=TOOLS, return_assistant_tokens_mask=True, return_dict=True
    )
    trained = tokenizer.decode(
        [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    )
    assert trained == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
        "It is sunny.<|im_end|>"
    )
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_chat_builds_deterministically_and_is_cached(tiny: Path, tmp_path: Path) -> None:
    again = ensure_base_model(TINY_CHAT, store_dir=tmp_path)
    assert _digest(again) == _digest(tiny)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(TINY_CHAT, store_dir=tmp_path) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_unknown_model_is_a_clear_error_never_a_download(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="meta-llama/Llama-3.1-8B-Instruct.*not available"):
        ensure_base_model("meta-llama/Llama-3.1-8B-Instruct", store_dir=tmp_path)
    blobs = FileBlobStore(tmp_path / "blobs")
    with pytest.raises(ModelNotFound, match="upload its weights"):
        ensure_base_model("Qwen/Qwen2.5-7B-Instruct", store_dir=tmp_path, blobs=blobs)
    assert not local_model_dir("Qwen/Qwen2.5-7B-Instruct", tmp_path).exists()


@pytest.mark.parametrize("name", ["../etc", "a/b/c", "", "/abs", "a b"])
def test_malformed_names_are_rejected(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        ensure_base_model(name, store_dir=tmp_path)


def test_config_without_weights_is_reported(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    blobs.root.joinpath("models", "acme", "half").mkdir(parents=True)
    blobs.root.joinpath("models", "acme", "half", "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="no weights"):
        ensure_base_model("acme/half", store_dir=tmp_path / "cache", blobs=blobs)


@pytest.mark.parametrize("backend", ["file", "s3"])
async def test_other_models_come_from_the_blob_store(
    backend: str, tiny: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "file":
        blobs: BlobStore = FileBlobStore(tmp_path / "blobs")
    else:
        url = request.getfixturevalue("s3_url")
        blobs = blob_store_from_url(f"{url.rsplit('/', 1)[0]}/m-{uuid.uuid4().hex[:12]}")
    await blobs.ensure_ready()
    # Called from inside a running event loop, as the api and serving do through to_thread or not.
    keys = upload_model("acme/tiny-copy", tiny, blobs)
    assert "models/acme/tiny-copy/model.safetensors" in keys
    fetched = ensure_base_model("acme/tiny-copy", store_dir=tmp_path / "cache", blobs=blobs)
    assert fetched == local_model_dir("acme/tiny-copy", tmp_path / "cache")
    assert _digest(fetched) == {k: v for k, v in _digest(tiny).items() if k != ".complete"} | {
        ".complete": _digest(fetched)[".complete"]
    }


@pytest.mark.slow
def test_smollm2_comes_from_the_shipped_gguf_as_a_plain_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.model_store import SMOLLM2

    folder = ensure_base_model(SMOLLM2, store_dir=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][prompt["input_ids"].shape[1] :])
