"""Small generic plumbing every script needs: the error type of bad input, atomic writes and file
copies, seeding, device and dtype choice. The dataset files are dataset_files.py, the one argument
parser arguments.py.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import random
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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


# --------------------------------------------------------------------------- failed saves
class SaveError(DataError):
    """A save that failed for lack of space, permission or another OS reason; the message is one
    line: what, where, why, that nothing half-written will be used, and how to resume."""


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
# torch's zip writer and numpy's short writes raise without an errno: a disk with less than this
# free, right after the failed write, was filled by it.
FULL_BELOW_BYTES = 16 << 20
_resume_hint: contextvars.ContextVar[Callable[[], str] | None] = contextvars.ContextVar("resume_hint", default=None)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            st = os.statvfs(folder)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return None


def _names_elsewhere(error: OSError, where: Path) -> bool:
    """Whether the OSError names only files outside the folder the output (and its temporary
    sibling) is written in."""
    names = [n for n in (error.filename, error.filename2) if n is not None]
    folder = where.absolute().parent
    return bool(names) and not any(Path(os.fsdecode(n)).absolute().is_relative_to(folder) for n in names)


def write_failure(error: BaseException, where: str | os.PathLike) -> tuple[str, int | None] | None:
    """(the OS reason, its errno or None) when ``error`` is a failed write, else None. OSErrors
    carry an errno, safetensors names it as "(os error N)"; for torch's zip writer and numpy's
    short writes, which carry none, the disk is asked whether it is full."""
    for e in _causes(error):
        if isinstance(e, OSError) and e.errno:
            if _names_elsewhere(e, Path(where)):
                return None  # a read of an input (e.g. a base model's files), not this write
            return e.strerror or os.strerror(e.errno), e.errno
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code:
            return os.strerror(int(code.group(1))), int(code.group(1))
    text = str(error)
    torch_write = isinstance(error, RuntimeError) and any(
        key in text for key in ("inline_container", "PytorchStreamWriter", "file write failed"))
    if not (isinstance(error, OSError) or torch_write):
        return None
    free = _free_bytes(Path(where))
    if free is not None and free < FULL_BELOW_BYTES:
        return os.strerror(errno.ENOSPC), errno.ENOSPC
    first_line = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"the write failed ({type(error).__name__}: {first_line})", None


def rerun_command(**flags: str) -> str:
    """The command line of this process (as ``python`` or ``torchrun``), with ``flags`` set."""
    argv = list(sys.argv)
    for flag, value in flags.items():
        name = f"--{flag}"
        kept, skip = [], False
        for arg in argv:
            if skip:
                skip = False
            elif arg == name:
                skip = True
            elif not arg.startswith(name + "="):
                kept.append(arg)
        argv = kept + [name, value]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    return f"{launcher} {shlex.join(argv)}"


@contextlib.contextmanager
def resume_hint(hint: Callable[[], str]) -> Iterator[None]:
    """Within this block a failed save ends with ``hint()`` (e.g. the command that resumes a
    training run) instead of the command that reruns this process."""
    token = _resume_hint.set(hint)
    try:
        yield
    finally:
        _resume_hint.reset(token)


@contextlib.contextmanager
def saving(what: str, where: str | os.PathLike, kept: str) -> Iterator[None]:
    """Turn a failed write inside the block into one SaveError line: ``what`` was being written to
    ``where``, the OS reason, ``kept`` (why nothing half-written will be used), what to fix and the
    command that resumes. Other errors pass through unchanged."""
    try:
        yield
    except SaveError:
        raise
    except Exception as e:
        failure = write_failure(e, where)
        if failure is None:
            raise
        reason, code = failure
        fix = ("free space there" if code in SPACE_ERRNOS else "make it writable" if code in ACCESS_ERRNOS
               else "fix that")
        hint = _resume_hint.get()
        resume = hint() if hint is not None else f"rerun: {rerun_command()}"
        raise SaveError(f"could not write {what} to {where}: {reason}; nothing half-written will be used "
                        f"({kept}); {fix}, then {resume}") from e


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "the output file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success. A failed
    write ends in a SaveError that names ``what`` and ``path``.

    The temporary file keeps the target's suffix so that writers which look at the extension
    (numpy, matplotlib, torch) behave as for the real name.
    """
    path = Path(path)
    kept = "it is written under a temporary name, removed now, and renamed only when complete"
    with saving(what, path, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like ordinary files
    tmp_path = Path(tmp)
    try:
        with saving(what, path, kept):  # inside: the disk is asked while the partial file still fills it
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int | None = None,
                      what: str = "the output file") -> None:
    with atomic_path(path, what) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)


def write_jsonl_atomic(rows: list[dict], path: str | os.PathLike, what: str = "the output file") -> None:
    with atomic_path(path, what) as tmp:
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


@contextlib.contextmanager
def folder_kept_only_if_used(path: str | os.PathLike) -> Iterator[None]:
    """On an error inside, remove ``path`` again if it did not exist before and is still empty: a
    refused run (a bad flag found after ``check_writable`` made the folder) leaves nothing behind."""
    folder = Path(path)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def write_results(results: dict, path: str | os.PathLike, table: str, flag: str = "--results_file") -> None:
    """Print the metrics table, then write the results JSON; a failed write names the file and
    says that the metrics are printed above."""
    print(table, flush=True)
    write_json_atomic(results, path, indent=2, what=f"the results ({flag}; the metrics are printed above)")
    print(f"results: {path}")


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike, what: str = "the output file") -> None:
    with atomic_path(path, what) as tmp:
        np.save(tmp, array)


def refuse_existing(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> None:
    if Path(path).exists() and not overwrite:
        raise DataError(f"{path}: output folder already exists; pass {flag} to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite",
               what: str = "the output folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only on success (a
    failed write ends in a SaveError that names ``what`` and ``path``).

    An existing ``path`` is refused (before any work) unless ``overwrite``; then it is replaced
    only once the new folder is complete. On failure nothing is left behind.
    """
    import shutil

    path = Path(path)
    refuse_existing(path, overwrite, flag)
    kept = f"it is built in a temporary folder, removed now, and renamed only when complete; {path} is unchanged"
    with saving(what, path, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with saving(what, path, kept):
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


def cpu_name() -> str:
    """The CPU's model name (lscpu's "Model name", from ``/proc/cpuinfo``), else what ``platform`` says."""
    import platform

    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or platform.machine() or "unknown CPU")


def cpu_description() -> str:
    """The CPU a timing ran on: its name, logical CPUs and native bf16 (every benchmark prints it)."""
    try:
        flags = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        flags = None
    native = [f for f in ("avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    return f"{cpu_name()}, {os.cpu_count()} cpus, {'+'.join(native) or 'no native bf16'}"


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
