"""`cached init`: a config sized for this machine, each value commented with why it was chosen.

What it looks at: the GPUs torch sees (else the CPU), memory (MemTotal), the size of /dev/shm,
whether the kernel has memfd, the free space where the disk tier would go, the CPUs. `detect()`
gathers those facts and `render()` turns them into TOML, so what is chosen can be checked for any
machine, not only this one.
"""

from __future__ import annotations

import grp
import os
import sys
from dataclasses import dataclass

from cached_client.units import format_bytes

from ..store.arena import memfd_supported
from .config import Config

__all__ = ["Machine", "detect", "render", "write_init"]

GiB = 1 << 30
SHM_SHARE = 4          # a quarter of memory for the shm tier
DEV_SHM_SHARE = 0.9    # at most this much of /dev/shm (other programs use it too)
DISK_SHARE = 2         # half of the free space for the disk tier
MIN_DISK = 2 * GiB     # below this free, no disk tier


@dataclass(frozen=True)
class Machine:
    gpus: list[tuple[str, int]]   # (name, memory bytes) of each CUDA device
    bf16: bool                    # the GPUs compute in bfloat16
    cpus: int
    memory: int                   # MemTotal
    dev_shm: int                  # size of the /dev/shm tmpfs (0: none)
    memfd: bool
    disk_dir: str                 # where the disk tier goes by default for this user
    disk_free: int                # free bytes there (its closest existing directory)


def detect() -> Machine:
    import torch

    cuda = torch.cuda.is_available()
    gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())] if cuda else []
    disk_dir = Config().disk_directory() or os.path.expanduser("~/.cache/cached")
    return Machine(gpus, bool(gpus) and torch.cuda.is_bf16_supported(), os.cpu_count() or 1, _memory(),
                   _fs_size("/dev/shm"), memfd_supported(), disk_dir, _free(disk_dir))


def _memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fs_size(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize


def _free(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    """`n` rounded down to a whole GiB (whole MiB under 1 GiB), as a config size."""
    return f"{n // GiB}GiB" if n >= GiB else f"{max(1, n >> 20)}MiB"


def _line(key: str, value: str, why: str) -> str:
    return f"{key} = {value}".ljust(36) + f" # {why}"


def render(m: Machine, vae: str | None = None) -> str:
    lines = [
        "# cached daemon config, written by `cached init` for this machine:",
        f"#   {len(m.gpus)} GPU(s){': ' + ', '.join(n for n, _ in m.gpus) if m.gpus else ''}; {m.cpus} CPUs; "
        f"{format_bytes(m.memory)} memory; /dev/shm {format_bytes(m.dev_shm)}; "
        f"{format_bytes(m.disk_free)} free at {m.disk_dir}",
        "# Check it with `cached serve --check-config --config FILE`; after editing a running daemon's",
        "# config, `systemctl reload cached` (SIGHUP) applies what can change without a restart.",
        "",
        "[server]",
        _line("socket", '""', "empty: /run/cached/cached.sock where writable, else $XDG_RUNTIME_DIR/cached"),
        _line("tcp", '""', "off: trainers on this machine use the unix socket"),
        *_group(),
        "",
        "[store]",
        *_shm(m),
        *_disk(m),
        _line("allowed_roots", "[]", "empty: any file the daemon can read; list your dataset roots"),
        _line("decode_workers", str(min(8, m.cpus)), f"{m.cpus} CPUs: image decoding threads, at most 8"),
        "",
        *_encoder(m, vae),
    ]
    return "\n".join(lines) + "\n"


def _group() -> list[str]:
    try:
        grp.getgrnam("cached")
    except KeyError:
        return [_line("group", '""', "no group `cached` here: the socket and segments get the daemon's group")]
    return [_line("group", '"cached"', "group `cached` exists: its members (trainers) reach the socket")]


def _shm(m: Machine) -> list[str]:
    share = m.memory // SHM_SHARE
    if m.memfd:
        return [_line("shm_backend", '"memfd"', "the kernel has memfd: no /dev/shm size limit, containers "
                      "need only the socket"),
                _line("shm_bytes", f'"{_size(share)}"', f"{format_bytes(m.memory)} memory: a quarter for the "
                      "shm tier (reserved at start), the rest for trainers")]
    cap = int(m.dev_shm * DEV_SHM_SHARE)
    why = (f"{format_bytes(m.memory)} memory: a quarter for the shm tier, the rest for trainers"
           if share <= cap else f"/dev/shm is {format_bytes(m.dev_shm)}: 90% of it (a quarter of memory "
           "would not fit)")
    return [_line("shm_backend", '"dev-shm"', "no memfd in this kernel: segments are files in /dev/shm"),
            _line("shm_bytes", f'"{_size(min(share, cap))}"', why)]


def _disk(m: Machine) -> list[str]:
    if m.disk_free < MIN_DISK:
        return [_line("disk_dir", '""', f"off: only {format_bytes(m.disk_free)} free at {m.disk_dir}")]
    return [_line("disk_dir", _quote(m.disk_dir), "the default for this user; entries survive restarts here"),
            _line("disk_bytes", f'"{_size(m.disk_free // DISK_SHARE)}"',
                  f"{format_bytes(m.disk_free)} free there: half for the disk tier"),
            _line("compression", '"lz4"', "fast enough not to slow reads, and latents shrink a little")]


def _encoder(m: Machine, vae: str | None) -> list[str]:
    if m.gpus:
        devices = "[" + ", ".join(f'"cuda:{i}"' for i in range(len(m.gpus))) + "]"
        where = f"{len(m.gpus)} GPU(s) found: one replica each"
        dtype, dwhy = ("bf16", "the GPUs compute in bf16") if m.bf16 else ("fp16", "the GPUs lack bf16")
        smallest = min(mem for _, mem in m.gpus)
        batch = 32 if smallest >= 40 * GiB else 16 if smallest >= 16 * GiB else 8
        bwhy = f"{format_bytes(smallest)} GPU memory; halved by itself on out-of-memory"
    else:
        devices, where = '["cpu"]', "no GPU found: encoding runs on the CPU"
        dtype, dwhy, batch, bwhy = "fp32", "CPUs compute in fp32", 4, "CPU encoding gains little from larger batches"
    lines = [
        "[encoders.vae]",
        _line("kind", '"diffusers-vae"', "an AutoencoderKL-family VAE from a local directory"),
        _line("path", _quote(vae) if vae else '"/models/sdxl-vae"', "config.json + *.safetensors"),
        _line("devices", devices, where),
        _line("dtype", f'"{dtype}"', dwhy),
        _line("max_batch", str(batch), bwhy),
        _line("max_queue_delay_ms", "5", "a partial batch waits this long for more items"),
    ]
    if vae:
        return lines
    return ["# An encoder: set path to your VAE and uncomment (or run `cached init --vae DIR`).",
            *("# " + line for line in lines)]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_init(out: str | None, force: bool = False, vae: str | None = None) -> int:
    """Prints the config, or writes it to `out` (never over an existing file without `force`)."""
    if out and os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    text = render(detect(), os.path.abspath(vae) if vae else None)
    if not out:
        sys.stdout.write(text)
        return 0
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0
