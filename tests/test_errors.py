"""One error tree, mapped at both edges of the RPC."""

from __future__ import annotations

import errno
import os

import grpc
import pytest

import cached_client
from cached_client.client import _mapped
from cached_client.errors import _BY_CODE, _BY_NAME, ERROR_METADATA, CacheError, error_for
from cached_client.views import shm_error


def test_every_status_code_maps_to_a_cache_error():
    codes = {c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
    assert set(_BY_CODE) == codes
    for code in codes:
        assert isinstance(error_for(code, "m"), CacheError)


def test_every_error_class_is_importable_from_the_package_and_round_trips():
    classes = [getattr(cached_client, n) for n in cached_client.__all__
               if isinstance(getattr(cached_client, n), type) and issubclass(getattr(cached_client, n), CacheError)]
    assert {c.__name__ for c in classes} >= {"CacheError", "DaemonUnavailable", "CacheMiss", "InvalidSpec",
                                             "SourceError", "CapacityError"}
    for cls in classes:
        grpc.StatusCode[cls.code]  # a real status code name
        err = error_for(cls.code, "boom", cls.__name__)
        assert type(err) is cls and str(err) == "boom"


@pytest.mark.parametrize("cls,builtin", [
    (cached_client.CacheMiss, KeyError), (cached_client.InvalidSpec, ValueError),
    (cached_client.SourceError, OSError), (cached_client.SourceNotAllowed, PermissionError),
    (cached_client.CapacityError, MemoryError), (cached_client.DaemonUnavailable, ConnectionError),
    (cached_client.DeadlineExceeded, TimeoutError), (cached_client.PermissionDenied, PermissionError)])
def test_builtins_subclassed_where_the_meaning_matches(cls, builtin):
    assert issubclass(cls, builtin) and issubclass(cls, CacheError)


def test_the_tree_in_the_docstring_draws_every_class():
    drawn = cached_client.errors.__doc__ or ""
    for name in _BY_NAME:
        assert f"── {name}" in drawn or f"    {name} " in drawn, f"{name} is missing from the tree in errors.py"


@pytest.mark.parametrize("errno_,cls", [
    (errno.EACCES, cached_client.PermissionDenied), (errno.EPERM, cached_client.PermissionDenied),
    (errno.ENOENT, cached_client.DaemonUnavailable), (errno.ENOMEM, cached_client.CapacityError),
    (errno.EMFILE, cached_client.CapacityError), (errno.EIO, cached_client.DaemonError)])
def test_shared_memory_the_client_cannot_map_is_a_cache_error(errno_, cls):
    err = shm_error("/dev/shm/cached-x-0000", OSError(errno_, os.strerror(errno_)))
    assert type(err) is cls and "/dev/shm/cached-x-0000" in str(err)
    assert type(shm_error("/dev/shm/cached-x-0000", ValueError("cannot mmap an empty file"))) is cached_client.DaemonError


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode | None, name: str = "") -> None:
        self._code, self._name = code, name

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self) -> tuple:
        return ((ERROR_METADATA, self._name),) if self._name else ()


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_the_client_maps_every_status_code_and_the_daemons_class_name(code):
    assert type(_mapped(_Failed(code))) is _BY_CODE[code.name]
    assert type(_mapped(_Failed(code, "UnknownEncoder"))) is cached_client.UnknownEncoder


def test_an_rpc_error_without_a_status_code_is_a_daemon_error():
    assert type(_mapped(_Failed(None))) is cached_client.DaemonError
