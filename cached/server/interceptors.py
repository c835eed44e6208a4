"""Maps domain errors to precise gRPC status codes at the server edge.

A CacheError travels as its class's status code, with the class name in the `cached-error` trailing
metadata so the client can raise the same class; anything else is a bug: logged with its traceback
and sent as INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cached_client.errors import ERROR_METADATA, CacheError

__all__ = ["ErrorInterceptor", "ERROR_METADATA"]

log = logging.getLogger(__name__)



def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, CacheError):
        context.set_trailing_metadata(((ERROR_METADATA, type(exc).__name__),))
        context.abort(grpc.StatusCode[exc.code], exc.message)
    log.exception("%s failed", method)
    context.set_trailing_metadata(((ERROR_METADATA, "DaemonError"),))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _unary(behavior: Callable, method: str) -> Callable:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            _abort(context, exc, method)
    return handle


def _stream(behavior: Callable, method: str) -> Callable:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            _abort(context, exc, method)
    return handle


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        method = details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_stream(handler.unary_stream, method))
        return handler
