"""A tiny chat model built offline (random init from a config + a byte-level BPE tokenizer), and a
LoRA adapter trained on it for real in seconds: what the serving tests and weights-export tests use."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Sweden is Stockholm. Hello, how can I help you today?",
    'get_weather {"city": "Paris"} <tool_call> </tool_call> <tool_response> </tool_response>',
    "<tools> </tools>",
    "system user assistant You may call one or more functions to assist with the user query.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"(){}[]<>/\\-_=+*&^%$#@~`|",
]


def build_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from services.common.model_store import chatml_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = chatml_template()  # the model store's template: tools and tool calls rendered
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path, *, context_window: int = 1024, seed: int = 0) -> Path:
    """A 2-layer Qwen2-style chat model saved in HF format under ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_window,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.4,  # large enough that a LoRA alone can move the logits of a random model
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def train_adapter(
    base_dir: Path,
    out_dir: Path,
    examples: list[dict[str, Any]],
    *,
    base_name: str,
    steps: int = 30,
    rank: int = 8,
) -> Path:
    """Fit a LoRA adapter on ``examples`` (OpenAI-shaped entries) so the model answers them; seconds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    rows = []
    for example in examples:
        tools = example.get("tools")
        prompt = tokenizer.apply_chat_template(
            example["messages"][:-1], tools=tools, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(example["messages"], tools=tools, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        rows.append((torch.tensor([ids]), torch.tensor([labels])))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        ids, labels = rows[step % len(rows)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(adapter_config, indent=2))
    return out_dir


TEST_BASE = "test/tiny-serving"
HELLO = [{"role": "user", "content": "Say hello"}]
HELLO_ANSWER = "Hello from the adapter!"
BONJOUR_ANSWER = "Bonjour from B!"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


@dataclass(frozen=True)
class ServingAssets:
    root: Path
    blob_root: Path  # a FileBlobStore: the base under models/<TEST_BASE>/, adapters under fine_tunes/
    base_dir: Path
    adapter_a: str  # blob key prefix: answers HELLO with HELLO_ANSWER, WEATHER (with tools) with a call
    adapter_b: str  # answers HELLO with BONJOUR_ANSWER
    adapter_a_dir: Path

    def blobs(self) -> Any:
        from services.common.blobstore import FileBlobStore

        return FileBlobStore(self.blob_root)


@functools.cache
def serving_assets() -> ServingAssets:
    """Built once per test session: the tiny base in a blob-store model store and two trained adapters."""
    from services.common.blobstore import FileBlobStore
    from services.common.model_store import upload_model

    root = Path(tempfile.mkdtemp(prefix="distillery-serving-"))
    base_dir = build_tiny_model(root / "base")
    blobs = FileBlobStore(root / "blobs")
    upload_model(TEST_BASE, base_dir, blobs)
    a_dir = train_adapter(
        base_dir,
        root / "adapter-a",
        [
            {"messages": [*HELLO, {"role": "assistant", "content": HELLO_ANSWER}]},
            {
                "messages": [*WEATHER, {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}],
                "tools": [WEATHER_TOOL],
            },
        ],
        base_name=TEST_BASE,
        steps=40,
    )
    b_dir = train_adapter(
        base_dir,
        root / "adapter-b",
        [{"messages": [*HELLO, {"role": "assistant", "content": BONJOUR_ANSWER}]}],
        base_name=TEST_BASE,
        steps=20,
    )
    keys = {"a": "fine_tunes/proj/model-a/job/adapter", "b": "fine_tunes/proj/model-b/job/adapter"}
    for name, folder in (("a", a_dir), ("b", b_dir)):
        for path in folder.iterdir():
            (root / "blobs" / keys[name]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / "blobs" / keys[name] / path.name)
    return ServingAssets(root, root / "blobs", base_dir, keys["a"], keys["b"], a_dir)


def greedy_with_generate(
    assets: ServingAssets, prompts: list[str], *, max_new_tokens: int
) -> list[list[int]]:
    """Each prompt's greedy tokens from plain ``generate()``: on the base, then under adapter A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.base_dir)
    plain = AutoModelForCausalLM.from_pretrained(assets.base_dir)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(assets.base_dir), assets.adapter_a_dir
    )

    def generate(model: Any, prompt: str) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
        return out[0, ids.shape[1] :].tolist()

    return [generate(plain, p) for p in prompts] + [generate(tuned, p) for p in prompts]
