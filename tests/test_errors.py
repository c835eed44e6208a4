"""One error tree, mapped at both edges of the RPC."""

from __future__ import annotations

import grpc
import pytest

import cached_client
from cached_client.errors import _BY_CODE, CacheError, error_for


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
    (cached_client.DeadlineExceeded, TimeoutError)])
def test_builtins_subclassed_where_the_meaning_matches(cls, builtin):
    assert issubclass(cls, builtin) and issubclass(cls, CacheError)
