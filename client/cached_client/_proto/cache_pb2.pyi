from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Owner(_message.Message):
    __slots__ = ("pid", "start_time", "client_id", "pid_ns")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PID_NS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: float
    client_id: str
    pid_ns: int
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[float] = ..., client_id: _Optional[str] = ..., pid_ns: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("encoder", "specs", "compute", "owner", "release")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SPECS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    specs: bytes
    compute: bool
    owner: Owner
    release: bytes
    def __init__(self, encoder: _Optional[str] = ..., specs: _Optional[bytes] = ..., compute: _Optional[bool] = ..., owner: _Optional[_Union[Owner, _Mapping]] = ..., release: _Optional[bytes] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("index", "code", "error", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: str
    error: str
    message: str
    def __init__(self, index: _Optional[int] = ..., code: _Optional[str] = ..., error: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("instance", "handles", "errors", "segments", "layouts", "control", "stamps")
    class SegmentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class LayoutsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    STAMPS_FIELD_NUMBER: _ClassVar[int]
    instance: str
    handles: bytes
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    segments: _containers.ScalarMap[int, str]
    layouts: _containers.ScalarMap[int, str]
    control: str
    stamps: bytes
    def __init__(self, instance: _Optional[str] = ..., handles: _Optional[bytes] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ..., segments: _Optional[_Mapping[int, str]] = ..., layouts: _Optional[_Mapping[int, str]] = ..., control: _Optional[str] = ..., stamps: _Optional[bytes] = ...) -> None: ...

class WarmRequest(_message.Message):
    __slots__ = ("encoder", "specs")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SPECS_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    specs: bytes
    def __init__(self, encoder: _Optional[str] = ..., specs: _Optional[bytes] = ...) -> None: ...

class WarmProgress(_message.Message):
    __slots__ = ("done", "total", "computed", "cached", "errors")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    computed: int
    cached: int
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., computed: _Optional[int] = ..., cached: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("queued", "dropped")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    queued: int
    dropped: int
    def __init__(self, queued: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("owner", "leases")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    owner: Owner
    leases: bytes
    def __init__(self, owner: _Optional[_Union[Owner, _Mapping]] = ..., leases: _Optional[bytes] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("all", "encoder", "source_prefix", "keys", "tier")
    ALL_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    all: bool
    encoder: str
    source_prefix: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    tier: str
    def __init__(self, all: _Optional[bool] = ..., encoder: _Optional[str] = ..., source_prefix: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., tier: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("entries", "bytes", "pending", "disk_entries", "disk_bytes", "remote_entries", "remote_bytes")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DISK_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_BYTES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    bytes: int
    pending: int
    disk_entries: int
    disk_bytes: int
    remote_entries: int
    remote_bytes: int
    def __init__(self, entries: _Optional[int] = ..., bytes: _Optional[int] = ..., pending: _Optional[int] = ..., disk_entries: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., remote_entries: _Optional[int] = ..., remote_bytes: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("entries", "bytes", "capacity_bytes", "backend", "held_bytes")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    bytes: int
    capacity_bytes: int
    backend: str
    held_bytes: int
    def __init__(self, entries: _Optional[int] = ..., bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., held_bytes: _Optional[int] = ...) -> None: ...

class EncoderStats(_message.Message):
    __slots__ = ("kind", "fingerprint", "devices", "items", "batches", "max_batch_seen", "busy_s", "queued", "max_batch", "fit_limit", "parameter_bytes", "input")
    class ParameterBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    FIT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    fingerprint: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    items: int
    batches: int
    max_batch_seen: int
    busy_s: float
    queued: int
    max_batch: int
    fit_limit: int
    parameter_bytes: _containers.ScalarMap[str, int]
    input: str
    def __init__(self, kind: _Optional[str] = ..., fingerprint: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., items: _Optional[int] = ..., batches: _Optional[int] = ..., max_batch_seen: _Optional[int] = ..., busy_s: _Optional[float] = ..., queued: _Optional[int] = ..., max_batch: _Optional[int] = ..., fit_limit: _Optional[int] = ..., parameter_bytes: _Optional[_Mapping[str, int]] = ..., input: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("instance", "uptime_s", "tiers", "counters", "encoders", "leases")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TierStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TierStats, _Mapping]] = ...) -> None: ...
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class EncodersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EncoderStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EncoderStats, _Mapping]] = ...) -> None: ...
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    instance: str
    uptime_s: float
    tiers: _containers.MessageMap[str, TierStats]
    counters: _containers.ScalarMap[str, int]
    encoders: _containers.MessageMap[str, EncoderStats]
    leases: int
    def __init__(self, instance: _Optional[str] = ..., uptime_s: _Optional[float] = ..., tiers: _Optional[_Mapping[str, TierStats]] = ..., counters: _Optional[_Mapping[str, int]] = ..., encoders: _Optional[_Mapping[str, EncoderStats]] = ..., leases: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("tier", "encoder", "source_prefix", "limit")
    TIER_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    tier: str
    encoder: str
    source_prefix: str
    limit: int
    def __init__(self, tier: _Optional[str] = ..., encoder: _Optional[str] = ..., source_prefix: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class EntryInfo(_message.Message):
    __slots__ = ("key", "tier", "bytes", "encoder", "source", "spec", "leases")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    key: str
    tier: str
    bytes: int
    encoder: str
    source: str
    spec: str
    leases: int
    def __init__(self, key: _Optional[str] = ..., tier: _Optional[str] = ..., bytes: _Optional[int] = ..., encoder: _Optional[str] = ..., source: _Optional[str] = ..., spec: _Optional[str] = ..., leases: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries", "total")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[EntryInfo]
    total: int
    def __init__(self, entries: _Optional[_Iterable[_Union[EntryInfo, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("format", "path", "encoder", "width", "height", "image_root", "arch", "crop")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ROOT_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    format: str
    path: str
    encoder: str
    width: int
    height: int
    image_root: str
    arch: str
    crop: str
    def __init__(self, format: _Optional[str] = ..., path: _Optional[str] = ..., encoder: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., image_root: _Optional[str] = ..., arch: _Optional[str] = ..., crop: _Optional[str] = ...) -> None: ...

class ImportProgress(_message.Message):
    __slots__ = ("seen", "imported", "already", "skipped", "examples")
    class SkippedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEEN_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    seen: int
    imported: int
    already: int
    skipped: _containers.ScalarMap[str, int]
    examples: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seen: _Optional[int] = ..., imported: _Optional[int] = ..., already: _Optional[int] = ..., skipped: _Optional[_Mapping[str, int]] = ..., examples: _Optional[_Iterable[str]] = ...) -> None: ...

class ClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("session", "pid", "uid", "leases", "leased_bytes", "items", "hits", "misses", "age_s")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    session: int
    pid: int
    uid: int
    leases: int
    leased_bytes: int
    items: int
    hits: int
    misses: int
    age_s: float
    def __init__(self, session: _Optional[int] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., leases: _Optional[int] = ..., leased_bytes: _Optional[int] = ..., items: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., age_s: _Optional[float] = ...) -> None: ...

class ClientsResponse(_message.Message):
    __slots__ = ("clients", "caller")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientInfo]
    caller: int
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientInfo, _Mapping]]] = ..., caller: _Optional[int] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., bytes: _Optional[int] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("key", "tiers", "bytes", "encoder", "source", "spec", "tensors", "leases", "meta")
    class BytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    key: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    bytes: _containers.ScalarMap[str, int]
    encoder: str
    source: str
    spec: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    leases: int
    meta: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., bytes: _Optional[_Mapping[str, int]] = ..., encoder: _Optional[str] = ..., source: _Optional[str] = ..., spec: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., leases: _Optional[int] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DiagnoseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SegmentInfo(_message.Message):
    __slots__ = ("name", "path", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    bytes: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class DiagnoseResponse(_message.Message):
    __slots__ = ("pid", "rss", "pss", "uss", "open_fds", "max_fds", "maps", "max_map_count", "shm_backend", "shm_dir", "shm_dir_size", "shm_dir_used", "shm_dir_free", "segments", "device_reserved_bytes", "disk_dir")
    class DeviceReservedBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PID_FIELD_NUMBER: _ClassVar[int]
    RSS_FIELD_NUMBER: _ClassVar[int]
    PSS_FIELD_NUMBER: _ClassVar[int]
    USS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    MAX_FDS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    MAX_MAP_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_USED_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FREE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_DIR_FIELD_NUMBER: _ClassVar[int]
    pid: int
    rss: int
    pss: int
    uss: int
    open_fds: int
    max_fds: int
    maps: int
    max_map_count: int
    shm_backend: str
    shm_dir: str
    shm_dir_size: int
    shm_dir_used: int
    shm_dir_free: int
    segments: _containers.RepeatedCompositeFieldContainer[SegmentInfo]
    device_reserved_bytes: _containers.ScalarMap[str, int]
    disk_dir: str
    def __init__(self, pid: _Optional[int] = ..., rss: _Optional[int] = ..., pss: _Optional[int] = ..., uss: _Optional[int] = ..., open_fds: _Optional[int] = ..., max_fds: _Optional[int] = ..., maps: _Optional[int] = ..., max_map_count: _Optional[int] = ..., shm_backend: _Optional[str] = ..., shm_dir: _Optional[str] = ..., shm_dir_size: _Optional[int] = ..., shm_dir_used: _Optional[int] = ..., shm_dir_free: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[SegmentInfo, _Mapping]]] = ..., device_reserved_bytes: _Optional[_Mapping[str, int]] = ..., disk_dir: _Optional[str] = ...) -> None: ...
