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
