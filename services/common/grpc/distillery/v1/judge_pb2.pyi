from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JudgeUsage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class JudgeRequest(_message.Message):
    __slots__ = ("criterion_id", "input_json", "output_json", "source")
    CRITERION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    criterion_id: str
    input_json: str
    output_json: str
    source: str
    def __init__(self, criterion_id: _Optional[str] = ..., input_json: _Optional[str] = ..., output_json: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class JudgeResponse(_message.Message):
    __slots__ = ("status", "score", "judgement", "explanation", "criterion_id", "model", "usage", "error_code", "error_message", "judgement_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENT_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    CRITERION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    status: str
    score: float
    judgement: str
    explanation: str
    criterion_id: str
    model: str
    usage: JudgeUsage
    error_code: str
    error_message: str
    judgement_id: str
    def __init__(self, status: _Optional[str] = ..., score: _Optional[float] = ..., judgement: _Optional[str] = ..., explanation: _Optional[str] = ..., criterion_id: _Optional[str] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[JudgeUsage, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., judgement_id: _Optional[str] = ...) -> None: ...

class HeadToHeadRequest(_message.Message):
    __slots__ = ("model", "instructions", "criterion_id", "input_json", "output_a_json", "output_b_json", "swap_check", "source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_A_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_B_JSON_FIELD_NUMBER: _ClassVar[int]
    SWAP_CHECK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    instructions: str
    criterion_id: str
    input_json: str
    output_a_json: str
    output_b_json: str
    swap_check: bool
    source: str
    def __init__(self, model: _Optional[str] = ..., instructions: _Optional[str] = ..., criterion_id: _Optional[str] = ..., input_json: _Optional[str] = ..., output_a_json: _Optional[str] = ..., output_b_json: _Optional[str] = ..., swap_check: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class HeadToHeadResponse(_message.Message):
    __slots__ = ("status", "winner", "explanation", "model", "usage", "error_code", "error_message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: str
    winner: str
    explanation: str
    model: str
    usage: JudgeUsage
    error_code: str
    error_message: str
    def __init__(self, status: _Optional[str] = ..., winner: _Optional[str] = ..., explanation: _Optional[str] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[JudgeUsage, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...
