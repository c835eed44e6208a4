"""The deploy files are valid and agree with the daemon: the unit passes `systemd-analyze verify`, the
sysusers.d and tmpfiles.d snippets apply (in a scratch root), the example config loads."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from cached.server.config import Config, load_config

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
UNIT = os.path.join(DEPLOY, "cached.service")
SYSUSERS = os.path.join(DEPLOY, "sysusers.d", "cached.conf")
TMPFILES = os.path.join(DEPLOY, "tmpfiles.d", "cached.conf")
SECONDS = {"s": 1, "sec": 1, "min": 60, "": 1}


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def service() -> dict[str, list[str]]:
    """The [Service] section of the unit: each key with its values in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in read(UNIT).splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    assert len(unit.get(key, [])) == 1, f"{key}= should be set once, got {unit.get(key)}"
    return unit[key][0]


def seconds(span: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|)", span)
    assert m, f"not a simple time span: {span!r}"
    return int(m[1]) * SECONDS[m[2]]


def snippet_lines(path: str) -> list[list[str]]:
    return [line.split() for line in read(path).splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path):
    unit = read(UNIT)
    assert "ExecStart=/opt/cached/venv/bin/cached serve" in unit
    # verify checks that ExecStart exists: point it at this checkout's entry point
    unit = unit.replace("/opt/cached/venv/bin/cached", os.path.join(os.path.dirname(sys.executable), "cached"))
    path = tmp_path / "cached.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in r.stderr.splitlines() if "cached.service" in line]
    assert r.returncode == 0 and not problems, r.stderr


def test_unit_is_a_notify_service_with_a_watchdog():
    unit = service()
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "Restart") == "on-failure"
    assert 0 < seconds(one(unit, "WatchdogSec")) <= 120
    assert seconds(one(unit, "TimeoutStartSec")) >= 300, "loading real encoders takes minutes"
    assert seconds(one(unit, "TimeoutStopSec")) >= Config().shutdown_grace + 10, "the daemon drains within the grace"


def test_unit_keeps_the_shared_memory_of_its_user():
    unit = service()
    assert "DynamicUser" not in unit, "DynamicUser implies RemoveIPC, which deletes the segments"
    assert one(unit, "RemoveIPC") == "no"
    assert one(unit, "User") == one(unit, "Group") == "cached"
    assert "MemoryMax" in unit and "MemoryHigh" in unit


def test_unit_lets_the_daemon_write_where_it_writes():
    unit, cfg = service(), load_config(os.path.join(DEPLOY, "cached.toml"), {"shm_bytes": "1MiB"})
    assert one(unit, "ProtectSystem") == "strict"
    assert os.path.dirname(cfg.socket) == "/run/" + one(unit, "RuntimeDirectory")
    assert one(unit, "RuntimeDirectoryPreserve") == "yes", "containers bind-mount /run/cached"
    assert "/var/cache/" + one(unit, "CacheDirectory") == "/var/cache/cached"  # disk_dir's default
    assert cfg.shm_dir in " ".join(unit["ReadWritePaths"]).split()
    assert one(unit, "PrivateTmp") == "yes" and "PrivateTmp=no" in read(os.path.join(DEPLOY, "README.md"))


def test_snippets_make_what_the_unit_uses():
    """sysusers.d makes the unit's User with its home in StateDirectory; tmpfiles.d makes the unit's
    runtime, cache and state directories, owned by that user, with the unit's modes, never aged."""
    unit = service()
    [user] = [fields for fields in snippet_lines(SYSUSERS) if fields[0] == "u"]
    assert user[1] == one(unit, "User") and user[-2] == "/var/lib/" + one(unit, "StateDirectory")
    made = {fields[1]: fields[2:] for fields in snippet_lines(TMPFILES) if fields[0] == "d"}
    for kind, base in (("Runtime", "/run/"), ("Cache", "/var/cache/"), ("State", "/var/lib/")):
        path = base + one(unit, f"{kind}Directory")
        assert made[path] == [one(unit, f"{kind}DirectoryMode"), "cached", "cached", "-"], path


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers or systemd-tmpfiles is not installed")
def test_snippets_apply_in_a_scratch_root(tmp_path):
    root = tmp_path / "root"
    for source, folder in ((SYSUSERS, "usr/lib/sysusers.d"), (TMPFILES, "usr/lib/tmpfiles.d")):
        (root / folder).mkdir(parents=True)
        shutil.copy(source, root / folder / "cached.conf")
    dry = subprocess.run(["systemd-sysusers", f"--root={root}", "--dry-run"], capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0 and "Creating user 'cached'" in dry.stderr, dry.stderr
    if os.geteuid() != 0:
        pytest.skip("creating the user and the directories (even in a scratch root) needs root")
    (root / "etc").mkdir()
    for tool in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        r = subprocess.run([*tool, f"--root={root}"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "cached.conf" not in r.stderr, r.stderr
    [uid] = [int(line.split(":")[2]) for line in read(str(root / "etc/passwd")).splitlines()
             if line.startswith("cached:")]
    for path, mode in (("run/cached", 0o755), ("var/cache/cached", 0o750), ("var/lib/cached", 0o750)):
        st = os.stat(root / path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, mode), path


def test_example_config_loads(tmp_path):
    cfg = load_config(os.path.join(DEPLOY, "cached.toml"), {"shm_bytes": "1MiB"})
    assert cfg.socket == "/run/cached/cached.sock"
    assert cfg.encoders["vae"]["kind"] == "diffusers-vae"
    assert cfg.allowed_roots == ["/data"]


def _containers(doc):
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc["spec"]
    return spec, spec["containers"]


def test_container_manifests_share_only_the_socket_directory(tmp_path):
    """memfd arenas come over the socket: no manifest asks for the host's IPC, a shared /dev/shm or a
    shared pid namespace, and the trainer mounts the daemon's socket directory and the dataset at the
    daemon's paths (the daemon opens the paths trainers send)."""
    docs = [d for f in ("daemonset.yaml", "trainer-pod.yaml") for d in yaml.safe_load_all(read(os.path.join(DEPLOY, "k8s", f)))]
    compose = yaml.safe_load(read(os.path.join(DEPLOY, "docker-compose.yml")))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["cached.toml"]
    (tmp_path / "cached.toml").write_text(config)
    cfg = load_config(str(tmp_path / "cached.toml"), {"shm_bytes": "1MiB"})
    assert cfg.shm_backend == "memfd" and cfg.group.isdigit()
    mounts = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            continue
        spec, containers = _containers(doc)
        assert not spec.get("hostIPC") and not spec.get("shareProcessNamespace") and not spec.get("hostPID")
        host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        assert "/dev/shm" not in host.values()
        mounts[doc["kind"]] = {m["mountPath"]: host.get(m["name"]) for c in containers for m in c["volumeMounts"]}
    assert set(mounts["Pod"]) == {"/run/cached", "/data"}
    for path, source in mounts["Pod"].items():
        assert mounts["DaemonSet"][path] == source == path, path
    pod = next(d for d in docs if d["kind"] == "Pod")
    assert pod["spec"]["securityContext"]["supplementalGroups"] == [int(cfg.group)]
    for name, service in compose["services"].items():
        assert "ipc" not in service and "shm_size" not in service and "pid" not in service, name
        assert not any(str(v).split(":")[0] == "/dev/shm" for v in service.get("volumes", [])), name
    trainer = compose["services"]["trainer"]
    assert {v.split(":")[1] for v in trainer["volumes"]} == {"/run/cached", "/data"}
