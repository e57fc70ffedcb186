"""What the api knows about base models: names it accepts, context sizes and prices.

Prices follow the seed's pricing table (``openpipe-docs.txt``, "Pricing Overview"): training is
charged per 1M training tokens by model size; inference per 1M input/output tokens. OpenAI bases
are billed at OpenAI's own fine-tuning rates (passed through, no markup).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from services.common.model_store import BUILTIN_MODELS, SMOLLM2, TINY_CHAT

# The seed's "Current Base Models" plus the SDK's list: accepted by name; they train wherever the
# model store holds their weights (GPU pods), and fail the job with a clear error elsewhere.
DOCUMENTED_BASES = (
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/Llama-3.2-3B-Instruct",
    "Qwen/Qwen2.5-72B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-14B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-Coder-7B-Instruct",
    "Qwen/Qwen2.5-Coder-32B-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct",
    "mistralai/Mistral-Nemo-Base-2407",
    "mistralai/Mistral-Small-24B-Base-2501",
    "google/gemma-3-1b-it",
    "google/gemma-3-4b-it",
    "google/gemma-3-12b-it",
    "google/gemma-3-27b-it",
)
OPENPIPE_BASES = (*BUILTIN_MODELS, *DOCUMENTED_BASES)

# OpenAI fine-tunable bases: (training $/1M tokens, fine-tuned inference $/1M in, out)
OPENAI_BASES: dict[str, tuple[float, float, float]] = {
    "gpt-4o-mini-2024-07-18": (3.00, 0.30, 1.20),
    "gpt-4o-2024-08-06": (25.00, 3.75, 15.00),
    "gpt-3.5-turbo-0125": (8.00, 3.00, 6.00),
    "gpt-4.1-2025-04-14": (25.00, 3.00, 12.00),
    "gpt-4.1-mini-2025-04-14": (5.00, 0.80, 3.20),
}
UNSUPPORTED_PROVIDERS = ("openpipeReward", "gemini")

# (largest size in billions of parameters, training $/1M tokens, inference $/1M in, out)
_SIZE_TIERS = (
    (8.0, 0.48, 0.30, 0.45),
    (14.0, 1.50, 1.00, 1.50),
    (32.0, 1.90, 1.00, 1.50),
    (math.inf, 2.90, 1.80, 2.00),
)
_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BM])(?![A-Za-z])", re.IGNORECASE)

_CONTEXT: dict[str, tuple[int, int]] = {TINY_CHAT: (2048, 512), SMOLLM2: (8192, 2048)}


@dataclass(frozen=True)
class BaseInfo:
    context_window: int
    max_completion_tokens: int
    training_price_per_million: float
    input_price_per_million: float
    output_price_per_million: float


def size_billions(name: str) -> float:
    """Parameters in billions read from the name (``...-8B-...`` → 8, ``...-135M-...`` → 0.135);
    0 when the name says nothing (our tiny model)."""
    sizes = [float(n) / (1000 if unit.upper() == "M" else 1) for n, unit in _SIZE.findall(name)]
    return max(sizes, default=0.0)


def base_info(name: str) -> BaseInfo:
    if name in OPENAI_BASES:
        training, chat_in, chat_out = OPENAI_BASES[name]
        return BaseInfo(128_000, 16_384, training, chat_in, chat_out)
    size = size_billions(name)
    _, training, chat_in, chat_out = next(tier for tier in _SIZE_TIERS if size <= tier[0])
    lowered = name.lower()
    default = (128_000, 4096) if "llama-3" in lowered or "nemo" in lowered else (32_768, 4096)
    window, completion = _CONTEXT.get(name, default)
    return BaseInfo(window, completion, training, chat_in, chat_out)


def training_cost(name: str, trained_tokens: int | None) -> float | None:
    if trained_tokens is None:
        return None
    return round(trained_tokens * base_info(name).training_price_per_million / 1_000_000, 6)
