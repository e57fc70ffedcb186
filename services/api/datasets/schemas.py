"""Wire schemas of the datasets API: request bodies, responses, and the entry schema the SDK publishes.

Shapes and casing follow the hosted product exactly (``shared/API-CONTRACT.md``): the public
routes are snake_case, the deprecated ``/unstable/...`` routes camelCase. Extra fields on a
``Dataset`` (per-split and SFT/preference counts, token totals) are additive: the SDK ignores them.

Entry rows are validated in two layers, as the hosted product does:

- ``check_entry_rows``: the request schema the SDK's types describe (``entries`` items are objects,
  ``messages`` a list of role-tagged messages, ``split`` ``TRAIN``/``TEST``, ``metadata`` a
  string → string map, ...). A violation anywhere rejects the whole request with a 400 whose
  message starts "Input validation failed" and names ``entries.<index>.<field>``.
- ``rows.parse_entry`` (through ``service.add_entries``): what the schema cannot express (the last
  message must be the assistant output, at least one input message, ...). A row failing here is
  reported by index in the response; the other rows are created.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from services.api.datasets.rows import ROLES, SPLITS
from services.common.errors import APIError, bad_request
from services.common.http import openapi_query

MAX_ENTRIES_PER_REQUEST = 10_000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
PROVENANCES = ("upload", "api", "request_log", "relabeled_by_model", "relabeled_by_human")
SOURCES = ("upload", "api", "request_log")
FILTERS = ("split", "provenance", "source", "search", "metadata.<key>", "limit", "cursor")

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
EntryId = Annotated[str, StringConstraints(min_length=1, max_length=40)]


# --- the entry schema (what the SDK's CreateDatasetEntriesRequestEntriesItem allows) ----------


def _content(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        return value
    raise ValueError("must be a string, a list of content parts (objects) or null")


def _string_or_object(value: Any) -> Any:
    if value is None or isinstance(value, str | dict):
        return value
    raise ValueError("must be a string or an object")


class MessageSchema(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal[ROLES]  # type: ignore[valid-type]
    content: Any = None

    _content = field_validator("content", mode="before")(_content)


class EntrySchema(BaseModel):
    model_config = ConfigDict(extra="allow")  # other chat parameters (temperature, ...) are ignored

    messages: list[MessageSchema]
    rejected_message: MessageSchema | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None  # deprecated form of tools
    function_call: Any = None  # deprecated form of tool_choice
    response_format: dict[str, Any] | None = None
    split: Literal["TRAIN", "TEST"] | None = None
    metadata: dict[str, str] | None = None
    judgement: Literal["PASS", "FAIL"] | None = None  # unstable route only; accepted and ignored

    _choice = field_validator("tool_choice", "function_call", mode="before")(_string_or_object)


_ENTRY = TypeAdapter(EntrySchema)


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def check_entry_rows(rows: list[Any], *, param: str = "entries") -> None:
    """Raise one 400 naming every schema problem (up to five) by ``entries.<index>.<field>``."""
    if len(rows) > MAX_ENTRIES_PER_REQUEST:
        raise bad_request(
            f"Too many entries in one request: {len(rows)}; the limit is {MAX_ENTRIES_PER_REQUEST}. "
            "Send them in several requests, or upload a JSONL file.",
            param=param,
            code="too_many_entries",
        )
    problems: list[str] = []
    first: str | None = None
    count = 0
    for index, row in enumerate(rows):
        try:
            _ENTRY.validate_python(row)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                where = _where((param, index, *error["loc"]))
                first = first or where
                count += 1
                if len(problems) < 5:
                    problems.append(f"{where}: {error['msg']}")
    if problems:
        more = f" (and {count - len(problems)} more)" if count > len(problems) else ""
        raise APIError(
            400, f"Input validation failed: {'; '.join(problems)}{more}", param=first, code="invalid_request"
        )


# --- requests --------------------------------------------------------------------------------


class DatasetCreate(BaseModel):
    name: Name


class DatasetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name


class EntriesCreate(BaseModel):
    """Items are checked by ``check_entry_rows`` so that the 400 can name ``entries.<i>.<field>``."""

    entries: list[Any]


class EntryUpdate(BaseModel):
    """``PATCH /datasets/{id}/entries/{entry_id}``: absent fields are unchanged.

    ``output`` (an assistant message) or ``messages`` (the whole conversation, ending with the
    assistant output) replace the output as a human relabel: the old output is kept as a revision,
    and with ``track_rejected`` it becomes the entry's ``rejected_message`` (a preference pair).
    ``metadata`` merges; a ``null`` value removes that key.
    """

    model_config = ConfigDict(extra="forbid")

    split: Literal["TRAIN", "TEST"] | None = None
    metadata: dict[str, str | None] | None = None
    output: MessageSchema | None = None
    messages: list[MessageSchema] | None = Field(default=None, min_length=2)
    rejected_message: MessageSchema | None = None
    track_rejected: bool = False

    @field_validator("split", "metadata", "output", "messages", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null; leave the field out to keep it")
        return value


class EntriesDelete(BaseModel):
    ids: list[EntryId] = Field(max_length=MAX_ENTRIES_PER_REQUEST)


class UnstableDatasetCreate(BaseModel):
    name: Name


class UnstableDatasetDelete(BaseModel):
    datasetId: str


class UnstableEntriesCreate(BaseModel):
    datasetId: str
    entries: list[Any]


# --- responses -------------------------------------------------------------------------------


class DatasetOut(BaseModel):
    object: Literal["dataset"] = "dataset"
    id: str
    name: str
    created: str
    updated: str
    dataset_entry_count: int
    fine_tune_count: int
    train_entry_count: int
    test_entry_count: int
    sft_entry_count: int  # entries without a rejected_message
    preference_entry_count: int  # entries with one (trained with DPO)
    prompt_tokens: int  # estimates (~4 characters per token)
    output_tokens: int


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetOut]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True


class EntryCreationError(BaseModel):
    object: Literal["dataset.entries.creation.error"] = "dataset.entries.creation.error"
    entry_index: int
    message: str


class EntryCreationErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[EntryCreationError]


class EntriesCreated(BaseModel):
    object: Literal["dataset.entries.creation"] = "dataset.entries.creation"
    entries_created: int
    duplicates: int = Field(
        default=0, description="valid entries skipped: the dataset already held the same content"
    )
    errors: EntryCreationErrors


class RevisionOut(BaseModel):
    revision: int
    output: dict[str, Any]
    rejected_message: dict[str, Any] | None
    provenance: str
    relabel_model: str | None
    created: str


class EntryOut(BaseModel):
    object: Literal["dataset.entry"] = "dataset.entry"
    id: str
    dataset_id: str
    messages: list[dict[str, Any]]  # the input followed by the output
    output: dict[str, Any]
    rejected_message: dict[str, Any] | None
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    response_format: dict[str, Any] | None
    split: str
    metadata: dict[str, str]
    provenance: str
    source: str
    source_log_id: str | None
    relabel_model: str | None
    revision: int
    prompt_tokens: int
    output_tokens: int
    created: str
    updated: str
    revisions: list[RevisionOut] | None = None  # only on GET /datasets/{id}/entries/{entry_id}


class EntryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EntryOut]
    has_more: bool
    next_cursor: str | None  # pass as ?cursor= for the next page


class EntriesDeleted(BaseModel):
    object: Literal["dataset.entries.deletion"] = "dataset.entries.deletion"
    deleted: int
    not_found: list[str]


class JobProgress(BaseModel):
    done: int
    total: int | None


class JobOut(BaseModel):
    object: Literal["dataset.job"] = "dataset.job"
    id: str
    kind: str
    status: str
    progress: JobProgress
    errors: list[dict[str, Any]]
    error_count: int
    result: dict[str, Any]
    created: str
    updated: str


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]


class UnstableDatasetId(BaseModel):
    datasetId: str


class UnstableDatasetItem(BaseModel):
    id: str
    name: str
    createdAt: str
    updatedAt: str
    datasetEntryCount: int
    fineTuneCount: int


class UnstableEntryError(BaseModel):
    index: int
    message: str


class UnstableEntriesCreated(BaseModel):
    createdEntries: int
    errors: list[UnstableEntryError]


# --- entry filters (query string) ------------------------------------------------------------


@dataclass
class EntryFilters:
    split: str | None = None
    provenance: str | None = None
    source: str | None = None
    search: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    limit: int = DEFAULT_PAGE_SIZE
    cursor: str | None = None


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise bad_request(f"Filter {name!r} must be one of {', '.join(allowed)}; got {value!r}.", param=name)
    return value


ENTRY_FILTER_QUERY = openapi_query(
    ("split", {"type": "string", "enum": list(SPLITS)}, "TRAIN or TEST"),
    ("provenance", {"type": "string", "enum": list(PROVENANCES)}, "how the current output came to be"),
    ("source", {"type": "string", "enum": list(SOURCES)}, "where the entry came from"),
    ("search", {"type": "string"}, "text the messages contain"),
    ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE}, "page size"),
    ("cursor", {"type": "string"}, "`next_cursor` of the previous page"),
)


def parse_entry_filters(params: Mapping[str, str] | list[tuple[str, str]]) -> EntryFilters:
    """``GET /datasets/{id}/entries`` query parameters; an unknown or repeated one is a 400 naming it."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    filters = EntryFilters()
    seen: set[str] = set()
    for name, value in items:
        if name in seen:
            raise bad_request(f"Filter {name!r} is given more than once.", param=name)
        seen.add(name)
        if name == "split":
            filters.split = _one_of(name, value, SPLITS)
        elif name == "provenance":
            filters.provenance = _one_of(name, value, PROVENANCES)
        elif name == "source":
            filters.source = _one_of(name, value, SOURCES)
        elif name == "search":
            if value.strip():
                filters.search = value
        elif name.startswith("metadata.") and len(name) > len("metadata."):
            filters.metadata[name[len("metadata.") :]] = value
        elif name == "limit":
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_PAGE_SIZE:
                raise bad_request(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}.", param="limit")
            filters.limit = int(value)
        elif name == "cursor":
            if value:
                filters.cursor = value
        else:
            raise bad_request(f"Unknown filter {name!r}; use one of {', '.join(FILTERS)}.", param=name)
    return filters
