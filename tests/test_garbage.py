"""Garbage in, one precise error out.

Daemon side, against a real daemon: every RPC of cached.v1.Cache (read from the descriptor, so a new
one is covered by itself) gets random bytes and validly encoded requests whose fields hold hostile
values. Each call ends with a precise refusal whose class matches its code (INVALID_ARGUMENT for
malformed input; a path not allowed or a bound hit have their own), or OK with every failed item's
error such a refusal. The daemon logs one line per refused call and never a traceback, and Stats
still answers within a second.
Client side: whatever a public CacheClient method raises for bad input or a bad reply is a CacheError.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor

from cached_client import (
    CacheClient,
    DaemonError,
    DaemonUnavailable,
    ImageSpec,
    InvalidSpec,
    ProtocolError,
    TextSpec,
)
from cached_client._proto import cache_pb2 as pb
from cached_client._proto import cache_pb2_grpc
from cached_client.errors import _BY_NAME, ERROR_METADATA
from cached_client.session import identity_socket, process_session
from cached_client.specs import MAX_LINE_BYTES, MAX_PATH_BYTES, MAX_TEXT_BYTES, decode_spec
from cached_client.wire import HANDLE, unpack_leases
from cached_testing.fixtures import write_images
from cached_testing.harness import Daemon

SERVICE = pb.DESCRIPTOR.services_by_name["Cache"]
METHODS = list(SERVICE.methods)
INVALID = {"InvalidSpec", "UnknownEncoder"}  # malformed input: INVALID_ARGUMENT
REFUSALS = INVALID | {"SourceNotAllowed", "LimitExceeded"}  # the other precise answers some garbage gets
RANDOM_CALLS = 20  # per method


# one call, sent as raw bytes

@dataclass
class Outcome:
    code: grpc.StatusCode
    error: str = ""  # the cached-error trailing metadata
    details: str = ""
    replies: list[Any] = field(default_factory=list)

    def item_errors(self) -> list[Any]:
        return [e for r in self.replies for e in getattr(r, "errors", ())]


def call_raw(channel: grpc.Channel, method: MethodDescriptor, data: bytes,
             metadata: tuple[tuple[str, str], ...]) -> Outcome:
    """Sends `data` as the request of `method` exactly as it is, replies decoded."""
    path = f"/{SERVICE.full_name}/{method.name}"
    decode = method.output_type._concrete_class.FromString
    try:
        if method.server_streaming:
            raw = list(channel.unary_stream(path)(data, timeout=60, metadata=metadata))
        else:
            raw = [channel.unary_unary(path)(data, timeout=60, metadata=metadata)]
    except grpc.RpcError as exc:
        error = dict(exc.trailing_metadata() or ()).get(ERROR_METADATA, "")
        return Outcome(exc.code(), error, exc.details() or "")
    return Outcome(grpc.StatusCode.OK, replies=[decode(r) for r in raw])


def assert_refused(method: MethodDescriptor, out: Outcome, what: str, names: set[str] = INVALID) -> None:
    """Refused as one of `names`, with that class's status code, in one line."""
    assert out.error in names and out.code.name == _BY_NAME[out.error].code, (method.name, what, out)
    assert "\n" not in out.details, out.details


def assert_refused_or_served(method: MethodDescriptor, out: Outcome, what: str) -> None:
    """A precise refusal, or OK where every failed item is one."""
    if out.code != grpc.StatusCode.OK:
        assert_refused(method, out, what, REFUSALS)
    for e in out.item_errors():
        assert e.error in REFUSALS and e.code == _BY_NAME[e.error].code, (method.name, what, e)


class Watch:
    """What a batch of garbage did to the daemon: its log lines, and whether it still answers."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.start = len(daemon.log())
        self.refused = 0

    def count(self, out: Outcome) -> Outcome:
        self.refused += out.code != grpc.StatusCode.OK
        return out

    def check(self) -> None:
        client = self.daemon.client(timeout=1.0)
        t0 = time.monotonic()
        client.stats()
        assert time.monotonic() - t0 < 1.0
        log = self.daemon.log()[self.start:]
        assert "Traceback" not in log, log[-3000:]
        lines = [ln for ln in log.splitlines() if f"/{SERVICE.full_name}/" in ln and " refused: " in ln]
        assert len(lines) == self.refused, (self.refused, lines[-5:])  # one line per refused call


@pytest.fixture
def rpc(daemon: Daemon) -> Iterator[tuple[grpc.Channel, tuple[tuple[str, str], ...]]]:
    channel = grpc.insecure_channel(daemon.address)
    yield channel, process_session(daemon.socket).metadata
    channel.close()


# (a) random bytes

@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_random_bytes_are_invalid_argument_never_internal(daemon, rpc, method):
    channel, metadata = rpc
    rng = random.Random(f"garbage-{method.name}")
    watch = Watch(daemon)
    for _ in range(RANDOM_CALLS):
        data = rng.randbytes(rng.choice([1, 2, 7, 64, 512]))
        assert_refused_or_served(method, watch.count(call_raw(channel, method, data, metadata)), repr(data))
    watch.check()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string_fields(message: Any, outer: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    """Field number paths of every string field, nested messages included."""
    for f in message.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            yield (*outer, f.number)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            yield from _string_fields(f.message_type, (*outer, f.number))


def _wrap(path: tuple[int, ...], payload: bytes) -> bytes:
    for number in reversed(path):
        payload = _length_delimited(number, payload)
    return payload


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_a_string_field_that_is_not_utf8_is_invalid_argument(daemon, rpc, method):
    channel, metadata = rpc
    watch = Watch(daemon)
    for path in _string_fields(method.input_type):
        data = _wrap(path, b"\xff\xfeok\xc3")
        assert_refused(method, watch.count(call_raw(channel, method, data, metadata)), f"{path} not UTF-8")
    watch.check()


# (b) well-formed requests, hostile values

HOSTILE_TEXT = ["\0", "/data/a\0b.png", "/" + "a" * (1 << 20), "a/" * 20_000, "\n" * 10_000,
                "../../../nonexistent", "%s%n{0}", "\u202e\ufeff\U0001f600"]
TOO_MUCH = {"\0", "/data/a\0b.png", "/" + "a" * (1 << 20), "a/" * 20_000, "\n" * 10_000}  # refused at parse
HOSTILE_NUMBERS = {FieldDescriptor.TYPE_UINT32: [0xFFFFFFFF, 0x80000000], FieldDescriptor.TYPE_UINT64: [2**64 - 1],
                   FieldDescriptor.TYPE_DOUBLE: [float("nan"), float("inf"), -float("inf"), -1e308],
                   FieldDescriptor.TYPE_BOOL: [True]}
NEGATIVE = _varint(2**64 - 1)  # -1 as a varint: what a hostile client sends for a uint32 field

SPEC_LINES = [
    b"\0" * 64, b"[" * 100_000, b'["i","/' + b"a" * (1 << 20) + b'",64,64,"center",false]', b"\xff\xfe\xfd",
    b'["i","a.png",64,64,"center",false]', b'["i","/a\\u0000b.png",64,64,"center",false]',
    b'["i","' + b"/a" * 300 + b'",64,64,"center",false]', b'["i","/' + b"b" * MAX_PATH_BYTES + b'",64,64,"center",false]',
    b'["i","/\\ud800.png",64,64,"center",false]', b'["t","' + b"x" * (MAX_TEXT_BYTES + 1) + b'"]',
    b'["t","a\\u0000b"]', b'["t","\\ud800"]', b'["t",1]', b'["t"]', b'["i",1,2,3]', b"null", b'{"i":1}',
    b'["i","/a.png",' + b"9" * 5000 + b',64,"center",false]', b'["i","/a.png",-1,64,"center",false]',
    b'["i","/a.png",64,64,[0,0,0,0],false]', b'["i","/a.png",64,64,"center","yes"]', b"x" * (MAX_LINE_BYTES + 1),
]


def _specs_payloads() -> list[tuple[str, bytes, int]]:
    """(what, specs field, items) cases: each line alone, all of them, and 10,000 newlines."""
    cases = [(f"line {i}", line, 1) for i, line in enumerate(SPEC_LINES)]
    return [*cases, ("all lines", b"\n".join(SPEC_LINES), len(SPEC_LINES)), ("newlines", b"\n" * 10_000, 10_001)]


BASE: dict[str, dict[str, Any]] = {  # what makes a hostile value reach past the first check
    "Get": {"encoder": "vae", "compute": False}, "Warm": {"encoder": "vae"}, "Prefetch": {"encoder": "vae"},
    "Import": {"format": "kohya", "encoder": "vae"},
}


def _request(method: MethodDescriptor, import_dir: str, **fields: Any) -> Any:
    base = dict(BASE.get(method.name, {}))
    if method.name == "Import":
        base["path"] = import_dir
    return method.input_type._concrete_class(**{**base, **fields})


def _hostile_fields(method: MethodDescriptor, import_dir: str) -> Iterator[tuple[str, bytes, bool]]:
    """(what, request bytes, refused for sure) for every scalar field of the request, nested too."""
    def walk(message: Any, outer: tuple[int, ...], names: str) -> Iterator[tuple[str, bytes, bool]]:
        for f in message.fields:
            name = f"{names}{f.name}"
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                yield from walk(f.message_type, (*outer, f.number), name + ".")
            elif f.type == FieldDescriptor.TYPE_STRING:
                for text in HOSTILE_TEXT:
                    inner = message._concrete_class(**{f.name: [text] if f.is_repeated else text})
                    yield f"{name}={text[:20]!r}", _wrap(outer, inner.SerializeToString()), text in TOO_MUCH
            elif f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
                yield f"{name}=-1", _wrap(outer, _varint(f.number << 3) + NEGATIVE), False
            for value in HOSTILE_NUMBERS.get(f.type, []):
                inner = message._concrete_class(**{f.name: value})
                yield f"{name}={value!r}", _wrap(outer, inner.SerializeToString()), False

    base = _request(method, import_dir)
    for what, data, refused in walk(method.input_type, (), ""):
        merged = type(base)()
        merged.MergeFrom(base)
        merged.MergeFromString(data)  # the hostile value replaces the base one
        yield what, merged.SerializeToString(), refused


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_hostile_field_values_are_refused_precisely(daemon, rpc, tmp_path, method):
    channel, metadata = rpc
    watch = Watch(daemon)
    for what, data, refused in _hostile_fields(method, str(tmp_path)):
        out = watch.count(call_raw(channel, method, data, metadata))
        (assert_refused if refused else assert_refused_or_served)(method, out, what)
    watch.check()


SPEC_METHODS = [m for m in METHODS if "specs" in m.input_type.fields_by_name]


@pytest.mark.parametrize("method", SPEC_METHODS, ids=[m.name for m in SPEC_METHODS])
def test_hostile_spec_lines_fail_their_items_not_the_call(daemon, rpc, tmp_path, method):
    channel, metadata = rpc
    watch = Watch(daemon)
    for what, specs, items in _specs_payloads():
        data = _request(method, str(tmp_path), specs=specs).SerializeToString()
        out = watch.count(call_raw(channel, method, data, metadata))
        if out.error == "LimitExceeded" and items > 1000:  # the daemon bounds the items of a request
            assert_refused(method, out, what, {"LimitExceeded"})
            continue
        assert out.code == grpc.StatusCode.OK, (what, out)
        errors = out.item_errors()
        if method.name == "Prefetch":
            assert (out.replies[0].queued, out.replies[0].dropped) == (0, 0), what  # bad items are skipped
        else:
            assert sorted(e.index for e in errors) == list(range(items)), what
            assert {(e.code, e.error) for e in errors} == {("INVALID_ARGUMENT", "InvalidSpec")}, what
            assert all("\n" not in e.message and len(e.message) < 1000 for e in errors), what
    watch.check()


LEASE_FIELDS = [(m, f) for m in METHODS for f in ("release", "leases") if f in m.input_type.fields_by_name]


@pytest.mark.parametrize("method,name", LEASE_FIELDS, ids=[f"{m.name}.{f}" for m, f in LEASE_FIELDS])
def test_lease_ids_not_a_multiple_of_8_bytes_are_invalid_argument(daemon, rpc, tmp_path, method, name):
    channel, metadata = rpc
    watch = Watch(daemon)
    for data in (b"\x01" * 7, b"\xff" * 9, b"\0" * 8001):
        out = watch.count(call_raw(channel, method, _request(method, str(tmp_path), **{name: data})
                                   .SerializeToString(), metadata))
        assert_refused(method, out, f"{name} of {len(data)} bytes")
        assert "multiple of 8" in out.details
    out = call_raw(channel, method, _request(method, str(tmp_path), **{name: b"\xff" * 16}).SerializeToString(),
                   metadata)
    assert out.code == grpc.StatusCode.OK  # whole ids this caller does not hold: nothing to give back
    watch.check()


def test_no_request_has_a_map_field():
    """The daemon's text-field check does not walk maps (cached/server/interceptors.py)."""
    def maps(message: Any) -> list[str]:
        found = []
        for f in message.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                found += [f.name] if f.message_type.GetOptions().map_entry else maps(f.message_type)
        return found
    assert [(m.name, maps(m.input_type)) for m in METHODS if maps(m.input_type)] == []


def test_a_crop_box_past_the_image_fails_its_item(daemon, images):
    spec = ImageSpec(images[0], (64, 64), crop=(0, 0, 10**30, 10**30))
    watch = Watch(daemon)
    with pytest.raises(InvalidSpec, match="outside"):
        daemon.client().get([spec], encoder="vae")
    watch.check()


# client side: specs

@pytest.mark.parametrize("path,match", [
    ("/a\0b", "NUL"), ("/" + "a" * (MAX_PATH_BYTES + 1), f"longer than {MAX_PATH_BYTES} bytes"),
    ("/a" * 300, "deeper than 256"), (42, "str or os.PathLike"), ("/\ud800", "UTF-8")])
def test_image_spec_refuses_a_bad_path_by_name(path, match):
    with pytest.raises(InvalidSpec, match=match) as info:
        ImageSpec(path, (64, 64))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("text,match", [
    ("a\0b", "NUL"), ("x" * (MAX_TEXT_BYTES + 1), f"longer than {MAX_TEXT_BYTES} bytes"), ("\ud800", "UTF-8"),
    (b"bytes", "must be a str")])
def test_text_spec_refuses_a_bad_text_by_name(text, match):
    with pytest.raises(InvalidSpec, match=match):
        TextSpec(text)


@pytest.mark.parametrize("line,match", [
    (b'["i","a.png",64,64,"center",false]', "absolute"), (b"[" * 100_000, "nested too deeply"),
    (b"\xff", "not UTF-8"), (b"\0\0\0[", "not JSON"), (b"x" * (MAX_LINE_BYTES + 1), "spec line is longer"),
    (b'["i","/a.png",64,64]', "not a spec"), (b'["t","\\ud800"]', "UTF-8"),
    (b'["i","/a\\u0000b",64,64,"center",false]', "NUL"), (b'["i","/a",64,64,"center",1]', "flip"),
    (b'["i","/a",' + b"9" * 5000 + b',64,"center",false]', "not JSON")])
def test_decode_spec_turns_any_line_into_one_line_of_invalid_spec(line, match):
    with pytest.raises(InvalidSpec, match=match) as info:
        decode_spec(line)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_decode_spec_bounds_are_parameters():
    line = TextSpec("x" * 100)._wire
    with pytest.raises(InvalidSpec, match="longer than 50 bytes"):
        decode_spec(line, max_text_bytes=50)
    long = b'["t","' + b"x" * (2 * MAX_TEXT_BYTES) + b'"]'
    assert decode_spec(long, max_text_bytes=4 * MAX_TEXT_BYTES).text == "x" * (2 * MAX_TEXT_BYTES)
    deep = ImageSpec("/a" * 100, (64, 64))._wire
    with pytest.raises(InvalidSpec, match="deeper than 10"):
        decode_spec(deep, max_path_depth=10)


def test_decode_spec_round_trips_valid_specs():
    for spec in (ImageSpec("rel/a.png", (64, 32), (0, 1, 5, 9), True), ImageSpec(b"/x/\xff.png", (8, 8)),
                 TextSpec(""), TextSpec("a\nb \U0001f600 \x01")):
        back = decode_spec(spec._wire)
        assert back == spec and back._wire == spec._wire and hash(back) == hash(spec)


# client side: calls

class FakeDaemon(cache_pb2_grpc.CacheServicer):
    """A daemon that answers with the replies a test sets: TCP, so no identity handshake is needed."""

    def __init__(self) -> None:
        self.get_reply = pb.GetResponse()
        self.warm_replies: list[pb.WarmProgress] = []
        self.released: list[int] = []

    def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        self.released += unpack_leases(request.release)
        return self.get_reply

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        self.released += unpack_leases(request.leases)
        return pb.ReleaseResponse()

    def Warm(self, request: pb.WarmRequest, context: Any) -> Iterator[pb.WarmProgress]:
        yield from self.warm_replies


@pytest.fixture
def fake() -> Iterator[tuple[FakeDaemon, CacheClient]]:
    servicer = FakeDaemon()
    server = grpc.server(ThreadPoolExecutor(2))
    cache_pb2_grpc.add_CacheServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, CacheClient(f"127.0.0.1:{port}", connect_timeout=1.0, tensors="numpy")
    server.stop(0)


def _handles(n: int, segment: int = 1, layout: int = 1) -> bytes:
    records = np.zeros(n, dtype=HANDLE)
    records["key"], records["lease"], records["length"] = b"k" * 32, 5, 16
    records["segment"], records["layout"] = segment, layout
    return records.tobytes()


@pytest.fixture
def segment_file(tmp_path) -> str:
    path = str(tmp_path / "segment")
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    return path


@pytest.mark.parametrize("case", ["short handles", "unknown segment", "error index", "bad layout"])
def test_a_malformed_get_reply_is_a_protocol_error(fake, segment_file, case):
    servicer, client = fake
    layout = '[["latent","float32",[4],0,16]]'
    reply = {"short handles": pb.GetResponse(handles=_handles(1)[:-3]),
             "unknown segment": pb.GetResponse(handles=_handles(1, segment=7), segments={1: segment_file},
                                               layouts={1: layout}),
             "error index": pb.GetResponse(handles=_handles(1), errors=[pb.ItemError(index=9, code="NOT_FOUND")]),
             "bad layout": pb.GetResponse(handles=_handles(1), segments={1: segment_file}, layouts={1: "{["})}
    servicer.get_reply = reply[case]
    with pytest.raises(ProtocolError):
        client.get([TextSpec("a")], encoder="clip")


def test_a_warm_reply_with_an_item_it_was_not_asked_is_a_protocol_error(fake):
    servicer, client = fake
    servicer.warm_replies = [pb.WarmProgress(errors=[pb.ItemError(index=3, code="INVALID_ARGUMENT")])]
    with pytest.raises(ProtocolError):
        client.warm([TextSpec("a")], encoder="clip")


@pytest.mark.parametrize("case,error", [("missing", DaemonUnavailable), ("empty", DaemonError),
                                        ("missing control", DaemonUnavailable)])
def test_shared_memory_the_client_cannot_map_is_a_cache_error(fake, tmp_path, case, error):
    servicer, client = fake
    empty = tmp_path / "empty"
    empty.touch()
    segment = {"missing": str(tmp_path / "gone"), "empty": str(empty)}.get(case, str(empty))
    control = str(tmp_path / "gone-ctl") if case == "missing control" else ""
    servicer.get_reply = pb.GetResponse(instance="x", handles=_handles(1), segments={1: segment},
                                        layouts={1: '[["latent","float32",[4],0,16]]'}, control=control)
    with pytest.raises(error):
        client.get([TextSpec("a")], encoder="clip")
    deadline = time.monotonic() + 5
    while 5 not in servicer.released and time.monotonic() < deadline:  # the lease watcher gives it back
        time.sleep(0.05)
    assert servicer.released == [5]


@pytest.mark.parametrize("call", ["get", "ls", "import_cache", "evict"])
def test_bad_arguments_are_invalid_spec(fake, call):
    _, client = fake
    calls = {"get": lambda: client.get(["not a spec"], encoder="vae"),  # type: ignore[list-item]
             "ls": lambda: client.ls(limit=-1),
             "import_cache": lambda: client.import_cache("kohya", "/x", "vae", size=(2**40, 1)),
             "evict": lambda: client.evict(keys=[1])}  # type: ignore[list-item]
    with pytest.raises(InvalidSpec):
        calls[call]()


# client side: a segment this user may not read

def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a child as another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")


# A child that imports as root, then becomes nobody (exec'ing as nobody would need the interpreter
# readable by it), runs `body` and prints the class of what it raised.
AS_NOBODY = """
import os, sys
import grpc._channel
from cached_client import CacheClient, ImageSpec
from cached_client.views import Segment
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
try:
    {body}
    print("no error")
except Exception as exc:
    print(type(exc).__name__, isinstance(exc, PermissionError), exc)
"""


def _as_nobody(body: str, *args: str) -> str:
    user = _nobody()
    code = AS_NOBODY.format(uid=user.pw_uid, gid=user.pw_gid, body=body)
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_segment_this_user_may_not_open_is_permission_denied():
    _nobody()
    directory = tempfile.mkdtemp(prefix="cached-test-", dir="/dev/shm")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "cached-0-1")
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        os.chmod(path, 0)
        out = _as_nobody("Segment(sys.argv[1])", path)
        assert out.startswith("PermissionDenied True ") and "group" in out, out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_client_whose_user_may_not_map_the_segments_gets_permission_denied(daemon_factory, tiny_vae):
    from conftest import vae_config

    _nobody()
    daemon = daemon_factory(vae_config(tiny_vae, shm_backend="dev-shm"))  # segments as files, by path
    workdir = tempfile.mkdtemp(prefix="cached-garbage-")  # unlike the daemon's, reachable by nobody
    os.chmod(workdir, 0o755)
    [image] = write_images(os.path.join(workdir, "images"), 1, [(64, 64)])
    daemon.client().get([ImageSpec(image, (64, 64))], encoder="vae")  # root: the segments exist now
    sock = os.path.join(workdir, "cached.sock")  # links to the daemon's sockets, in a directory nobody reaches
    os.link(daemon.socket, sock)
    os.link(identity_socket(daemon.socket), identity_socket(sock))
    files = [os.path.join(daemon.shm_dir, name) for name in daemon.segments()]
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in [sock, identity_socket(sock), daemon.shm_dir, *files]}
    try:
        for path in (sock, identity_socket(sock)):
            os.chmod(path, 0o666)
        os.chmod(daemon.shm_dir, 0o755)
        for path in files:  # the control page readable, the segments not
            os.chmod(path, 0o644 if path.endswith("-ctl") else 0)
        out = _as_nobody("CacheClient(sys.argv[1], tensors='numpy').get([ImageSpec(sys.argv[2], (64, 64))], 'vae')",
                         "unix://" + sock, image)
        assert out.startswith("PermissionDenied True ") and "cached-" in out, out
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
        shutil.rmtree(workdir, ignore_errors=True)
