"""Module-scoped pytest fixtures of an S3 endpoint: the test credentials in the environment (daemons
started by the test inherit them), moto's server, and a FaultProxy in front of it. A test module
that uses them says `pytest_plugins = ("cached_testing.s3fixtures",)`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .s3 import CREDENTIALS, FaultProxy, MotoServer

__all__ = ["aws_env", "moto", "proxy"]


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(k, raising=False)
        yield


@pytest.fixture(scope="module")
def moto(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(str(tmp_path_factory.mktemp("moto") / "moto.log")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    p = FaultProxy(moto.port)
    yield p
    p.close()
