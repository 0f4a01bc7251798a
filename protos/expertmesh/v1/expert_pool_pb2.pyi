from expertmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "hidden", "hidden_scale", "response_dtype", "placement_version", "pairs", "pair_weights")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SCALE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    PAIR_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: _tensor_pb2.Tensor
    hidden_scale: _tensor_pb2.Tensor
    response_dtype: _tensor_pb2.ElementType
    placement_version: int
    pairs: _tensor_pb2.Tensor
    pair_weights: _tensor_pb2.Tensor
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., hidden_scale: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., response_dtype: _Optional[_Union[_tensor_pb2.ElementType, str]] = ..., placement_version: _Optional[int] = ..., pairs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pair_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("partial", "decode_us", "compute_us", "received_ns", "answered_ns")
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_NS_FIELD_NUMBER: _ClassVar[int]
    partial: _tensor_pb2.Tensor
    decode_us: int
    compute_us: int
    received_ns: int
    answered_ns: int
    def __init__(self, partial: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., decode_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., received_ns: _Optional[int] = ..., answered_ns: _Optional[int] = ...) -> None: ...

class ForwardStreamRequest(_message.Message):
    __slots__ = ("request", "id", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request: ForwardRequest
    id: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, request: _Optional[_Union[ForwardRequest, _Mapping]] = ..., id: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ForwardStreamResponse(_message.Message):
    __slots__ = ("response", "id", "error_code", "error_message")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    response: ForwardResponse
    id: int
    error_code: int
    error_message: str
    def __init__(self, response: _Optional[_Union[ForwardResponse, _Mapping]] = ..., id: _Optional[int] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("pool_id", "experts", "weight_bytes", "forward_calls", "routed_pairs", "placement_version")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    weight_bytes: int
    forward_calls: int
    routed_pairs: int
    placement_version: int
    def __init__(self, pool_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., weight_bytes: _Optional[int] = ..., forward_calls: _Optional[int] = ..., routed_pairs: _Optional[int] = ..., placement_version: _Optional[int] = ...) -> None: ...

class LoadExpertsRequest(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ...) -> None: ...

class LoadExpertsResponse(_message.Message):
    __slots__ = ("loaded",)
    LOADED_FIELD_NUMBER: _ClassVar[int]
    loaded: int
    def __init__(self, loaded: _Optional[int] = ...) -> None: ...

class UnloadExpertsRequest(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ...) -> None: ...

class UnloadExpertsResponse(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: int
    def __init__(self, unloaded: _Optional[int] = ...) -> None: ...
