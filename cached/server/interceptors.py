"""Maps domain errors to precise gRPC status codes at the server edge, and parses requests there.

A CacheError travels as its class's status code, with the class name in the `cached-error` trailing
metadata so the client can raise the same class; the daemon logs it as one line (a refused request
is the caller's mistake, not the daemon's). Anything else is a bug: logged with its traceback and
sent as INTERNAL.

gRPC deserializes a request before any handler runs, and a deserializer that raises makes grpc log
a traceback and answer INTERNAL by itself. So each handler's deserializer is wrapped: bytes that are
no request of the method's type, or a request with a text field no request may hold (a NUL byte,
more than `max_field_bytes`), deserialize to a marker that the handler turns into InvalidSpec:
INVALID_ARGUMENT, one log line, and the servicer never sees it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from cached_client.errors import ERROR_METADATA, CacheError, InvalidSpec
from cached_client.specs import MAX_PATH_BYTES, check_text

__all__ = ["ErrorInterceptor", "ERROR_METADATA", "MAX_FIELD_BYTES"]

log = logging.getLogger(__name__)

# The longest text any request field means is a path (PATH_MAX); names, tiers and hex keys are short.
# Specs travel as bytes and have their own bounds (cached_client/specs.py).
MAX_FIELD_BYTES = MAX_PATH_BYTES
# what parsing hostile bytes can raise (a ValueError: also a UnicodeError, a string field not UTF-8)
_BAD_INPUT = (DecodeError, ValueError, RecursionError)
_LOGGED_CHARS = 500


class _Unparsed:
    """What a request that failed to parse deserializes to (None would make grpc answer INTERNAL)."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidSpec) -> None:
        self.error = error


def _check_texts(message: Message, max_bytes: int) -> None:
    """InvalidSpec when a string field, at any depth, holds a NUL byte or more than `max_bytes` bytes.
    Map fields are not walked: no request has one (tests/test_garbage.py checks)."""
    strings, messages = _fields(message.DESCRIPTOR)
    for name, repeated in strings:
        value = getattr(message, name)
        for text in value if repeated else (value,):
            if text:
                check_text(text, max_bytes=max_bytes, what=f"{message.DESCRIPTOR.name}.{name}")
    for name, repeated in messages:
        if repeated or message.HasField(name):
            value = getattr(message, name)
            for sub in value if repeated else (value,):
                _check_texts(sub, max_bytes)


@functools.cache
def _fields(descriptor: Descriptor) -> tuple[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...]]:
    """(string fields, message fields but maps) of a message type, as (name, repeated)."""
    strings = tuple((f.name, f.is_repeated) for f in descriptor.fields if f.type == f.TYPE_STRING)
    messages = tuple((f.name, f.is_repeated) for f in descriptor.fields
                     if f.type == f.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry)
    return strings, messages


def _parser(deserializer: Callable[[bytes], Any], max_field_bytes: int) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            request = deserializer(data)
            if isinstance(request, Message):
                _check_texts(request, max_field_bytes)
            return request
        except InvalidSpec as exc:
            return _Unparsed(exc)
        except _BAD_INPUT as exc:
            return _Unparsed(InvalidSpec(f"{len(data)} bytes that are not a valid request: "
                                         f"{type(exc).__name__}: {exc}"))
    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, _Unparsed):
        raise request.error
    return request


def _one_line(text: str) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= _LOGGED_CHARS else text[:_LOGGED_CHARS] + "..."


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    """Ends the call with `exc`'s status (context.abort raises, so this never returns)."""
    if isinstance(exc, CacheError):
        log.info("%s refused: %s: %s", method, type(exc).__name__, _one_line(exc.message))
        context.set_trailing_metadata(((ERROR_METADATA, type(exc).__name__),))
        context.abort(grpc.StatusCode[exc.code], exc.message)
    log.exception("%s failed", method)
    context.set_trailing_metadata(((ERROR_METADATA, "DaemonError"),))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _unary(behavior: Callable, method: str) -> Callable:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(_parsed(request), context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            _abort(context, exc, method)
    return handle


def _stream(behavior: Callable, method: str) -> Callable:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(_parsed(request), context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            _abort(context, exc, method)
    return handle


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every unary-request handler (unary and server-streaming replies): its deserializer, so
    garbage is INVALID_ARGUMENT, and its behavior, so errors get precise codes. Request-streaming
    handlers (none in cached.v1.Cache) are left as they are."""

    def __init__(self, max_field_bytes: int = MAX_FIELD_BYTES) -> None:
        self.max_field_bytes = max_field_bytes

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        method = details.method
        if handler.request_deserializer is not None:
            handler = handler._replace(
                request_deserializer=_parser(handler.request_deserializer, self.max_field_bytes))
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_stream(handler.unary_stream, method))
        return handler
