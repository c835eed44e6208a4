"""The committed stubs are exactly what `make proto` generates from proto/cached/v1/cache.proto."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUBS = ("cache_pb2.py", "cache_pb2.pyi", "cache_pb2_grpc.py")


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--proto_path=cached_client/_proto=proto/cached/v1",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         "cached_client/_proto/cache.proto"], cwd=ROOT, check=True)
    for name in STUBS:
        with open(tmp_path / "cached_client" / "_proto" / name) as f:
            fresh = f.read()
        with open(os.path.join(ROOT, "client", "cached_client", "_proto", name)) as f:
            committed = f.read()
        assert committed == fresh, f"{name} is stale: run `make proto` and commit the result"


def test_stamps_travel_as_five_int64s_per_item_and_a_wrong_count_is_a_protocol_error():
    import pytest

    from cached_client import ProtocolError
    from cached_client.wire import NO_STAMP, pack_stamps, unpack_stamps

    stamp = (2049, 1 << 40, 123, 1_700_000_000_123_456_789, 1_700_000_001_000_000_000)
    data = pack_stamps([stamp, NO_STAMP])
    assert len(data) == 80
    assert unpack_stamps(data, 2) == [stamp, None]
    assert unpack_stamps(b"", 3) == [None, None, None]  # a daemon that sends none: stamped by the client
    with pytest.raises(ProtocolError, match="stamps"):
        unpack_stamps(data, 3)
