"""One base model, many LoRA adapters, continuous (dynamic) batching on one decoding thread.

Every step the engine thread (1) admits waiting sequences: prefills them together (left-padded)
and merges their KV cache into the running batch, and (2) decodes one token for every running
sequence in a single forward pass — rows on different adapters included, through peft's
mixed-adapter batches. A sequence that finishes leaves the batch at once; one that arrives joins at
the next step, so concurrent requests share every forward pass instead of waiting in line.

Prompts that start alike (a chat template's system prompt, an application's fixed instructions) share
a cached prefix: its KV cache is computed once per adapter and copied into each batch that starts
with it, so a prefill computes only what follows it (vLLM calls this automatic prefix caching).

The async side (``submit``) gets ``Delta`` events on an ``asyncio.Queue`` per sequence.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
MIXED = "__mixed__"  # the engine's state while a batch mixes adapters (see Engine._switch_to)
# An idle engine gathers requests arriving together for up to this long, until none came for the
# quiet time (costs a lone request the quiet time).
GATHER_SECONDS = 0.08
GATHER_QUIET_SECONDS = 0.02
# A shared prompt start shorter than this is not worth a cache entry.
MIN_PREFIX_TOKENS = 16
PREFIX_CACHE_ENTRIES = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Text that must not be streamed until the sequence ends (tool-call markup).
    hold_after: str | None = None


@dataclass(frozen=True)
class Delta:
    """New text for one sequence; ``finish_reason`` set on its last event; ``error`` if it failed."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


Emit = Callable[[Delta], None]


@dataclass
class Sequence:
    prompt_ids: list[int]
    adapter: str | None  # internal adapter name, None for the base
    params: SamplingParams
    emit: Emit
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded output already emitted
    cancelled: bool = False
    done: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class EngineError(Exception):
    pass


class Engine:
    """Serves one base model and the LoRA adapters loaded onto it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_adapters: int = 8,
        context_window: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.model = model.eval()
        # A prefill keeps the logits of each row's last position only: a strided slice of the hidden
        # states that, under a LoRA adapter, made torch multiply it by the output matrix copied
        # once per row (8 rows: 0.3 s of a 0.8 s prefill). Contiguous, it is one plain matmul.
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.context_window = context_window or int(
            getattr(model.config, "max_position_embeddings", 0) or 2048
        )
        self.eos_ids = _eos_ids(model, tokenizer)
        self.peft: Any = None  # the PeftModel once a first adapter is loaded
        self._active: str | None = None  # what peft is set up for (_switch_to); None: unknown
        self.adapters: OrderedDict[str, Path] = OrderedDict()  # loaded, least recently used first
        self._adapter_paths: dict[str, Path] = {}
        self._forget: set[str] = set()
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._waiting: list[Sequence] = []
        self._rows: list[Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        # (adapter, token ids) -> the KV cache of those tokens for one row; least recently used first
        self._prefixes: OrderedDict[tuple[str | None, tuple[int, ...]], Any] = OrderedDict()
        self._last_prompt: dict[str | None, list[int]] = {}
        self._stopped = False
        self.steps = 0
        self.peak_batch = 0
        self.prefix_hits = 0  # prompts whose prefill started from a cached prefix
        self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._thread.start()

    # --- the async side ------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        self._inbox.put(sequence)

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def count_tokens(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # --- adapters (engine thread only) ---------------------------------------------------------

    def _ensure_adapter(self, name: str, path: Path) -> bool:
        """Load ``name`` (evicting the least recently used idle one at capacity); False: wait."""
        if name in self.adapters:
            self.adapters.move_to_end(name)
            return True
        if len(self.adapters) >= self.max_adapters:
            busy = {row.adapter for row in self._rows}
            idle = next((n for n in self.adapters if n not in busy), None)
            if idle is None:
                return False
            self._evict(idle)
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=name)
            self.peft.eval()
        self._active = None  # loading may change peft's active adapter
        self.adapters[name] = path
        log.info("adapter %s loaded (%d on this base)", name, len(self.adapters))
        return True

    def _evict(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._active = None
        for key in [key for key in self._prefixes if key[0] == name]:
            del self._prefixes[key]
        self._last_prompt.pop(name, None)
        if self.peft is not None and name in self.peft.peft_config:
            if len(self.peft.peft_config) == 1:
                # peft keeps at least one adapter: unwrap the base and start over.
                self.model = self.peft.unload()
                self.peft = None
            else:
                if self.peft.active_adapter == name:  # make another active first, as peft would
                    self.peft.set_adapter(next(a for a in self.peft.peft_config if a != name))
                self.peft.delete_adapter(name)
        log.info("adapter %s evicted (least recently used)", name)

    # --- the decoding loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._drain_inbox(block=not self._rows and not self._waiting)
                self._drop_cancelled()
                if self._forget:
                    self._evict_forgotten()
                for group in _by_adapter(self._admit()):
                    self._prefill(group)
                if self._rows:
                    self._decode()
            except Exception as exc:  # a failed step fails its sequences, never the server
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        # Woken from idle: requests sent together reach the engine one by one (the server parses
        # them in turn), so gather them a moment to share one prefill instead of the first
        # running alone while the others wait for it.
        deadline = time.monotonic() + (GATHER_SECONDS if block else 0.0)
        while item is not None:
            self._waiting.append(item)
            left = deadline - time.monotonic()
            try:
                item = (
                    self._inbox.get(timeout=min(left, GATHER_QUIET_SECONDS))
                    if left > 0
                    else self._inbox.get_nowait()
                )
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        if any(row.cancelled for row in self._rows):
            self._keep([i for i, row in enumerate(self._rows) if not row.cancelled])

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        still: list[Sequence] = []
        for seq in self._waiting:
            if seq.cancelled:
                continue
            if len(self._rows) + len(admitted) >= self.max_batch:
                still.append(seq)
                continue
            adapter = seq.adapter
            if adapter is not None and adapter not in self._adapter_paths:
                seq.done = True
                seq.emit(Delta(error="the adapter was unloaded before this request started"))
                continue
            if adapter is not None and not self._ensure_adapter(adapter, self._adapter_paths[adapter]):
                still.append(seq)
                continue
            admitted.append(seq)
        self._waiting = still
        return admitted

    def register_adapter(self, name: str, path: Path) -> None:
        """Where to load ``name`` from when a sequence first needs it (a local adapter folder)."""
        self._forget.discard(name)
        self._adapter_paths[name] = path

    def forget_adapter(self, name: str) -> None:
        """Stop serving ``name``; its weights leave memory once no running sequence uses them."""
        self._adapter_paths.pop(name, None)
        self._forget.add(name)

    def _evict_forgotten(self) -> None:
        busy = {row.adapter for row in self._rows}
        for name in list(self._forget):
            if name not in busy:
                self._forget.discard(name)
                if name in self.adapters:
                    self._evict(name)

    def _forward(self, rows: list[Sequence], **inputs: Any) -> torch.Tensor:
        """One forward pass for ``rows``; one adapter (or none) for all is cheaper than a mixed batch."""
        adapters = [row.adapter or BASE for row in rows]
        unique = set(adapters)
        with torch.inference_mode():
            if self.peft is None:
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            elif len(unique) == 1:
                self._switch_to(adapters[0])
                out = self.peft(**inputs, use_cache=True, logits_to_keep=1)
            else:
                self._switch_to(MIXED)
                out = self.peft(**inputs, use_cache=True, logits_to_keep=1, adapter_names=adapters)
        return out.logits[:, -1, :]

    def _switch_to(self, target: str) -> None:
        """Set peft up for ``target``: ``BASE`` (adapter layers off), one adapter, or ``MIXED`` (layers
        on, each row naming its own). Only a change costs: each toggle walks every LoRA layer (~10 ms
        on SmolLM2-135M), and peft's ``disable_adapter()`` context also reads the model's status
        (~45 ms per forward in all, for every decoding step of a base-model batch)."""
        if self._active == target:
            return
        if target == BASE:
            self.peft.base_model.disable_adapter_layers()
        else:
            if self._active in (None, BASE):  # unknown (an adapter was loaded or evicted) or off
                self.peft.base_model.enable_adapter_layers()
            if target != MIXED:
                self.peft.set_adapter(target)
        self._active = target

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill rows that share one adapter: from a cached prefix when they all start with one."""
        from transformers import DynamicCache

        prefix = self._shared_prefix(seqs)
        start = len(prefix)
        cache = self._prefix_cache(seqs, prefix) if prefix else DynamicCache(config=self.model.config)
        suffixes = [s.prompt_ids[start:] for s in seqs]
        width = max(len(x) for x in suffixes)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes], device=self.device)
        new = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in suffixes], device=self.device)
        positions = start + (new.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([new.new_ones(len(seqs), start), new], dim=1)  # padding sits after the prefix
        logits = self._forward(
            seqs, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache
        )
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=self.device)
        self._merge(seqs, cache, mask, lengths)
        self._sample_and_emit(seqs, logits)
        self.prefix_hits += len(seqs) if prefix else 0

    def _shared_prefix(self, seqs: list[Sequence]) -> tuple[int, ...]:
        """The longest cached prefix every row starts with; or, when these rows share a start with
        each other or with this adapter's previous prompt that is longer by at least
        ``MIN_PREFIX_TOKENS``, that start (to be cached). A row always keeps at least one token of
        its own to prefill. (Requiring the margin keeps a template's common head in use instead of
        caching every few words two prompts happen to share after it.)"""
        adapter = seqs[0].adapter
        prompts = [s.prompt_ids for s in seqs]
        limit = min(len(p) for p in prompts) - 1
        previous = self._last_prompt.get(adapter)
        self._last_prompt[adapter] = prompts[-1]
        cached = [
            ids
            for key_adapter, ids in self._prefixes
            if key_adapter == adapter and len(ids) <= limit and all(_starts_with(p, ids) for p in prompts)
        ]
        best = max(cached, key=len) if cached else ()
        others = prompts + ([previous] if previous else [])
        if len(others) < 2:
            return best
        shared = min(min(_common_length(prompts[0], other) for other in others[1:]), limit)
        return tuple(prompts[0][:shared]) if shared >= len(best) + MIN_PREFIX_TOKENS else best

    def _prefix_cache(self, seqs: list[Sequence], prefix: tuple[int, ...]) -> Any:
        """A KV cache holding ``prefix`` for each of ``seqs`` (computed once per adapter, then copied)."""
        from transformers import DynamicCache

        key = (seqs[0].adapter, prefix)
        one = self._prefixes.get(key)
        if one is None:
            one = DynamicCache(config=self.model.config)
            ids = torch.tensor([prefix], device=self.device)
            self._forward(seqs[:1], input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=one)
            self._prefixes[key] = one
            while len(self._prefixes) > PREFIX_CACHE_ENTRIES:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        cache = DynamicCache(config=self.model.config)
        for index, layer in enumerate(one.layers):
            cache.update(
                layer.keys.expand(len(seqs), -1, -1, -1).clone(),
                layer.values.expand(len(seqs), -1, -1, -1).clone(),
                index,
            )
        return cache

    def _merge(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self._cache is None or not self._rows:
            self._rows, self._cache, self._mask, self._positions = list(seqs), cache, mask, positions
            return
        assert self._mask is not None and self._positions is not None
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)])
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)]
            )
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
        self._positions = torch.cat([self._positions, positions])
        self._rows = self._rows + list(seqs)

    def _decode(self) -> None:
        assert self._mask is not None and self._positions is not None
        rows = self._rows
        ids = torch.tensor([[row.output_ids[-1]] for row in rows], device=self.device)
        ones = torch.ones(len(rows), 1, dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        logits = self._forward(
            rows,
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=self._positions[:, None],
            past_key_values=self._cache,
        )
        self._positions = self._positions + 1
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        self._sample_and_emit(rows, logits)
        self._keep([i for i, row in enumerate(self._rows) if not row.done and not row.cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Drop finished rows from the batch, and cache columns that only padding uses."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._positions = [], None, None, None
            return
        assert self._mask is not None and self._positions is not None
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.cumsum(-1) == 0).sum(-1).min())  # leading columns no row uses
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self._positions = self._positions.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]

    # --- sampling and output -------------------------------------------------------------------

    def _sample_and_emit(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        logits = logits.float().cpu()
        for row, row_logits in zip(rows, logits, strict=True):
            if row.done or row.cancelled:
                continue
            token = _sample(row_logits, row.params, row.generator)
            row.output_ids.append(token)
            self._emit_progress(row, token)

    def _emit_progress(self, row: Sequence, token: int) -> None:
        finish: str | None = None
        ids = row.output_ids
        if token in self.eos_ids:
            finish, ids = "stop", ids[:-1]
        elif len(row.output_ids) >= row.params.max_tokens or row.length >= self.context_window:
            finish = "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in row.params.stop:
            at = text.find(stop)
            if at != -1:
                text, finish = text[:at], "stop"
        if finish is None:
            safe = _streamable(text, row.params)
            if safe > row.sent:
                row.emit(Delta(text=text[row.sent : safe], completion_tokens=len(row.output_ids)))
                row.sent = safe
            return
        row.done = True
        row.emit(Delta(text=text[row.sent :], finish_reason=finish, completion_tokens=len(row.output_ids)))

    def _fail_all(self, message: str) -> None:
        for row in self._rows + self._waiting:
            if not row.done:
                row.done = True
                row.emit(Delta(error=message))
        self._rows, self._waiting, self._cache, self._mask, self._positions = [], [], None, None, None


def _streamable(text: str, params: SamplingParams) -> int:
    """How much of ``text`` can be sent now: not a partial character, stop string or held markup."""
    end = len(text)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
        end = len(text.rstrip("\ufffd"))
    markers = list(params.stop) + ([params.hold_after] if params.hold_after else [])
    if params.hold_after and params.hold_after in text:
        end = min(end, text.index(params.hold_after))
    for marker in markers:
        for size in range(min(len(marker) - 1, end), 0, -1):
            if text[:end].endswith(marker[:size]):
                end -= size
                break
    return max(end, 0)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _contiguous_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def _by_adapter(seqs: list[Sequence]) -> list[list[Sequence]]:
    groups: dict[str | None, list[Sequence]] = {}
    for seq in seqs:
        groups.setdefault(seq.adapter, []).append(seq)
    return list(groups.values())


def _starts_with(ids: list[int], prefix: tuple[int, ...]) -> bool:
    return len(ids) >= len(prefix) and tuple(ids[: len(prefix)]) == prefix


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


async def collect(queue_: asyncio.Queue[Delta]) -> tuple[str, str, int]:
    """Wait for a sequence to end: its whole text, finish reason and completion tokens."""
    parts: list[str] = []
    while True:
        delta = await queue_.get()
        if delta.error:
            raise EngineError(delta.error)
        parts.append(delta.text)
        if delta.finish_reason:
            return "".join(parts), delta.finish_reason, delta.completion_tokens


def threadsafe_emitter(loop: asyncio.AbstractEventLoop, queue_: asyncio.Queue[Delta]) -> Emit:
    return lambda delta: loop.call_soon_threadsafe(queue_.put_nowait, delta)


def monotonic_ms() -> float:
    return time.monotonic() * 1000
