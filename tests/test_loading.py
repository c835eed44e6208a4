"""Weight readers: the automatic choice, the fallback from a fastsafetensors that fails here to
safetensors (one warning per process), and fastsafetensors kept off the caller's thread. Real files
and models, on the CPU; where fastsafetensors is made to fail, its import or its reader is replaced."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cached.encoders import loading
from cached.encoders.loading import choose_reader, load_model, read_safetensors


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


@pytest.fixture
def weights(tmp_path: Any) -> tuple[list[str], dict[str, torch.Tensor]]:
    """A small model's weights in a safetensors file: ([path], state_dict)."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build().state_dict().items()}
    path = os.path.join(str(tmp_path), "model.safetensors")
    save_file(state, path)
    return [path], state


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fastsafetensors failure recorded yet, as in a new process; restored after the test."""
    monkeypatch.setattr(loading, "_fastsafetensors_failure", None)


@pytest.fixture
def cuda_like_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic choice made for the CPU as for a CUDA device with fastsafetensors installed, so
    loads that would use fastsafetensors can run here."""
    choose = loading.choose_reader
    monkeypatch.setattr(loading, "fastsafetensors_available", lambda: True)
    monkeypatch.setattr(loading, "choose_reader", lambda device: choose("cuda:0"))


def broken_fastsafetensors(error: BaseException | None) -> types.ModuleType | None:
    """A stand-in for fastsafetensors whose reader raises `error`; None (an import that fails) for
    error None."""
    if error is None:
        return None

    def fastsafe_open(*args: Any, **kwargs: Any) -> Any:
        raise error

    return types.SimpleNamespace(fastsafe_open=fastsafe_open)  # type: ignore[return-value]


def test_choice_by_device_and_by_what_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "fastsafetensors_available", lambda: True)
    assert choose_reader("cuda:0") == "fastsafetensors" and choose_reader("cuda") == "fastsafetensors"
    assert choose_reader("cpu") == "safetensors"
    loading._give_up_fastsafetensors(OSError("libcudart.so: cannot open shared object file"))
    assert choose_reader("cuda:0") == "safetensors"
    monkeypatch.setattr(loading, "_fastsafetensors_failure", None)
    monkeypatch.setattr(loading, "fastsafetensors_available", lambda: False)
    assert choose_reader("cuda:0") == "safetensors"


@pytest.mark.parametrize("error", [
    None,  # not installed, or its extension does not import
    OSError("libcudart.so: cannot open shared object file: No such file or directory"),
    RuntimeError("cuFile initialisation failed"),
    Exception("[FAIL] GPU runtime library not found (expected libcudart.so, ...)"),  # what it raises
], ids=["import", "oserror", "runtimeerror", "exception"])
def test_a_failing_fastsafetensors_falls_back_with_one_warning(
        error: BaseException | None, weights: tuple[list[str], dict[str, torch.Tensor]],
        cuda_like_cpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    files, state = weights
    monkeypatch.setitem(sys.modules, "fastsafetensors", broken_fastsafetensors(error))
    with caplog.at_level(logging.INFO, logger="cached.encoders.loading"):
        models = [load_model(build, lambda: pytest.fail("fell back to from_pretrained"), files, "cpu",
                             torch.float32) for _ in range(2)]
    for model in models:
        got = model.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fastsafetensors" in warnings[0].getMessage()
    assert ("ModuleNotFoundError" if error is None else type(error).__name__) in warnings[0].getMessage()
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loads) == 2 and all(" with safetensors " in m for m in loads)


def test_a_reader_named_explicitly_raises_its_error(weights: tuple[list[str], dict[str, torch.Tensor]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastsafetensors", None)
    with pytest.raises(ImportError):
        read_safetensors(weights[0], "cpu", reader="fastsafetensors")
    assert loading._fastsafetensors_failure is None  # a benchmark's failure says nothing of the choice


def recording_fastsafetensors(threads: list[int]) -> types.ModuleType:
    """A stand-in for fastsafetensors that reads through safetensors and records the thread it ran
    on: that is the thread on which the real one calls torch.cuda.set_device."""

    @contextlib.contextmanager
    def fastsafe_open(files: list[str], framework: str, device: str, nogds: bool) -> Iterator[Any]:
        threads.append(threading.get_ident())
        with contextlib.ExitStack() as stack:
            opened = [stack.enter_context(safe_open(f, framework=framework, device=device)) for f in files]
            tensors = {k: f.get_tensor(k) for f in opened for k in f.keys()}
            yield types.SimpleNamespace(keys=tensors.keys, get_tensor=tensors.__getitem__)

    return types.SimpleNamespace(fastsafe_open=fastsafe_open)  # type: ignore[return-value]


def test_fastsafetensors_reads_off_the_callers_thread(weights: tuple[list[str], dict[str, torch.Tensor]],
                                                      cuda_like_cpu: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    files, state = weights
    threads: list[int] = []
    monkeypatch.setitem(sys.modules, "fastsafetensors", recording_fastsafetensors(threads))
    got = read_safetensors(files, "cpu")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert threads[0] not in {t.ident for t in threading.enumerate()}  # joined: nothing left running
