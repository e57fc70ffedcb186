from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fallback(_message.Message):
    __slots__ = ("model", "timeout_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    timeout_ms: int
    def __init__(self, model: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class CompletionRequest(_message.Message):
    __slots__ = ("request_json", "log_request", "cache", "tags", "fallback")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    LOG_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    request_json: str
    log_request: bool
    cache: str
    tags: _containers.ScalarMap[str, str]
    fallback: Fallback
    def __init__(self, request_json: _Optional[str] = ..., log_request: _Optional[bool] = ..., cache: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., fallback: _Optional[_Union[Fallback, _Mapping]] = ...) -> None: ...

class CompletionResponse(_message.Message):
    __slots__ = ("completion_json",)
    COMPLETION_JSON_FIELD_NUMBER: _ClassVar[int]
    completion_json: str
    def __init__(self, completion_json: _Optional[str] = ...) -> None: ...

class CompletionChunk(_message.Message):
    __slots__ = ("chunk_json",)
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    chunk_json: str
    def __init__(self, chunk_json: _Optional[str] = ...) -> None: ...
