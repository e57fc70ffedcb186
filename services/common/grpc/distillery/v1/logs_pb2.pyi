from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogFilters(_message.Message):
    __slots__ = ("model", "completion_id", "status", "requested_after_ms", "requested_before_ms", "metadata", "request_contains", "response_not_contains")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BEFORE_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NOT_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    model: str
    completion_id: str
    status: str
    requested_after_ms: int
    requested_before_ms: int
    metadata: _containers.ScalarMap[str, str]
    request_contains: str
    response_not_contains: str
    def __init__(self, model: _Optional[str] = ..., completion_id: _Optional[str] = ..., status: _Optional[str] = ..., requested_after_ms: _Optional[int] = ..., requested_before_ms: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., request_contains: _Optional[str] = ..., response_not_contains: _Optional[str] = ...) -> None: ...

class SearchLogsRequest(_message.Message):
    __slots__ = ("filters", "limit", "before_id", "batch_size", "omit_raw_payloads", "fields")
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OMIT_RAW_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    filters: LogFilters
    limit: int
    before_id: str
    batch_size: int
    omit_raw_payloads: bool
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, filters: _Optional[_Union[LogFilters, _Mapping]] = ..., limit: _Optional[int] = ..., before_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., omit_raw_payloads: _Optional[bool] = ..., fields: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestLogBatch(_message.Message):
    __slots__ = ("logs",)
    LOGS_FIELD_NUMBER: _ClassVar[int]
    logs: _containers.RepeatedCompositeFieldContainer[RequestLog]
    def __init__(self, logs: _Optional[_Iterable[_Union[RequestLog, _Mapping]]] = ...) -> None: ...

class CountLogsRequest(_message.Message):
    __slots__ = ("filters",)
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    filters: LogFilters
    def __init__(self, filters: _Optional[_Union[LogFilters, _Mapping]] = ...) -> None: ...

class CountLogsResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class RequestLog(_message.Message):
    __slots__ = ("id", "requested_at_ms", "received_at_ms", "latency_ms", "model", "provider", "completion_id", "status", "status_code", "error_message", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "cache_hit", "metadata", "req_payload_json", "resp_payload_json", "openai_request_json", "openai_response_json")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQ_PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    RESP_PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    OPENAI_REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    OPENAI_RESPONSE_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    requested_at_ms: int
    received_at_ms: int
    latency_ms: int
    model: str
    provider: str
    completion_id: str
    status: str
    status_code: int
    error_message: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cache_hit: bool
    metadata: _containers.ScalarMap[str, str]
    req_payload_json: str
    resp_payload_json: str
    openai_request_json: str
    openai_response_json: str
    def __init__(self, id: _Optional[str] = ..., requested_at_ms: _Optional[int] = ..., received_at_ms: _Optional[int] = ..., latency_ms: _Optional[int] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., completion_id: _Optional[str] = ..., status: _Optional[str] = ..., status_code: _Optional[int] = ..., error_message: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ..., cache_hit: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., req_payload_json: _Optional[str] = ..., resp_payload_json: _Optional[str] = ..., openai_request_json: _Optional[str] = ..., openai_response_json: _Optional[str] = ...) -> None: ...
