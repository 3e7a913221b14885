"""Small generic plumbing every script needs: the error type of bad input, atomic writes and file
copies, seeding, device and dtype choice. The dataset files are dataset_files.py, the one argument
parser arguments.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

class DataError(ValueError):
    """Bad input: the message names the file, field or flag and what was expected."""


@contextlib.contextmanager
def exit_on_data_error(*also: type[Exception]) -> Iterator[None]:
    """End a script on bad input (a DataError, or one of ``also``) with one line ``error: <message>``
    on stderr and exit status 1, not a traceback: the message already says what to fix."""
    try:
        yield
    except (DataError, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file keeps the target's suffix so that writers which look at the extension
    (numpy, matplotlib, torch) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like ordinary files
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int | None = None) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)


def write_jsonl_atomic(rows: list[dict], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")




def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> None:
    """Fail before any work when output file ``path`` (or, with ``is_dir``, output folder ``path``)
    cannot be created or written: a run that ends in a PermissionError loses its work."""
    folder = Path(path) if is_dir else Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = "" if is_dir else f" its folder {folder}"
        raise DataError(f"{flag} {path}:{where} cannot be created or written ({e.strerror or e})") from e


def write_results(results: dict, path: str | os.PathLike, table: str, flag: str = "--results_file") -> None:
    """Print the metrics table, then write the results JSON; a failed write names the file and
    says that the metrics are printed above."""
    print(table, flush=True)
    try:
        write_json_atomic(results, path, indent=2)
    except OSError as e:
        raise DataError(f"{flag} {path}: could not write the results ({e.strerror or e}); "
                        "the metrics are printed above") from e
    print(f"results: {path}")


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def refuse_existing(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> None:
    if Path(path).exists() and not overwrite:
        raise DataError(f"{path}: output folder already exists; pass {flag} to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only on success.

    An existing ``path`` is refused (before any work) unless ``overwrite``; then it is replaced
    only once the new folder is complete. On failure nothing is left behind.
    """
    import shutil

    path = Path(path)
    refuse_existing(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "replaced")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy whichever of ``names`` exist in ``src``; returns the names copied."""
    import shutil

    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- runtime
def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(gpu_id: int | None = None) -> "torch.device":  # noqa: F821
    """cuda:<gpu_id> (or LOCAL_RANK under torchrun) when CUDA exists, else cpu."""
    import torch

    if torch.cuda.is_available():
        if gpu_id is None:
            gpu_id = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", gpu_id)
    return torch.device("cpu")


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Native bf16 arithmetic on this CPU (avx512_bf16 or AMX on x86, the bf16 extension on Arm),
    read from ``/proc/cpuinfo`` (or the text given). Without it torch emulates bf16 matmuls,
    which then run slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    info = cpuinfo
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", info) is not None


def cpu_autocast_bf16(device: "torch.device", choice: str = "auto") -> bool:  # noqa: F821
    """Whether to decode under bf16 autocast: only on a CPU, and with ``auto`` only where the CPU has
    native bf16 (an emulated bf16 matmul is slower than an fp32 one)."""
    if device.type != "cpu" or choice == "off":
        return False
    return choice == "on" or cpu_supports_bf16()


def default_dtype(device: "torch.device") -> "torch.dtype":  # noqa: F821
    """bf16 on GPUs that support it, fp32 on CPU (bf16 matmuls are slow and lossy there)."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
