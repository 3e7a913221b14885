"""Model-folder I/O shared by convert.py, make_delta.py and merge_delta.py: finding a folder's
weight files (single or sharded, safetensors or .bin), reading tensors lazily, writing
safetensors shards with their index, and the delta arithmetic both delta scripts must agree on.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from utils import DataError

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DELTA_INFO = "delta_info.json"  # written by make_delta.py: which tensors are stored whole, the base's hash
BASE_HASH = "base_weights_sha256"  # its key in delta_info.json: weights_hash of the base tensors used
HASH_CHUNK = 1 << 24  # bytes read per step when hashing a stored tensor
# A tied model saves no output head: its weight is the input embedding.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
# The tensors whose first dimension is the vocabulary (resized when index tokens are added).
VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "embed_out.weight", "wte.weight")
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSOR_SUFFIXES)


def parse_size(size: str | int) -> int:
    """"5GB", "100MB", "50KB" (powers of 1000) or "2GiB" (powers of 1024) to bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise DataError(f"--max-shard-size: cannot read {size!r}; expected e.g. 5GB, 100MB or 50KB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# --------------------------------------------------------------------------- locating models
def resolve_model_path(path: str, flag: str) -> Path:
    """A local model folder as is; otherwise a hub id, downloaded (weights in one format only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise DataError(f"{flag}: {path} is a file; expected a model folder or a hub model id")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(path)
        weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
            else ["*.bin", "*.bin.index.json"]
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.model", "*.txt", "*.jinja", *weights]))
    except Exception as e:  # offline, unknown id, no access
        raise DataError(f"{flag}: {path} is not a local folder and could not be fetched from the hub "
                        f"({type(e).__name__}: {e})") from e


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, safetensors preferred, in index order."""
    for index_name, single in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (folder / index_name).is_file():
            weight_map = read_index(folder / index_name)
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise DataError(f"{folder / index_name}: lists shard(s) {missing} that are not in the folder")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise DataError(f"{folder}: no model weights ({SAFE_WEIGHTS}, {BIN_WEIGHTS} or a sharded index of either)")


def read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid shard index (expected a 'weight_map' object): {e}") from e
    return weight_map


class WeightReader:
    """Lazy access to the tensors of a model folder: names and shapes come from the file headers,
    a tensor is read only when asked for. ``close()`` drops the open files (and their mapped pages)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self._open: dict[Path, object] = {}
        self.location: dict[str, Path] = {}
        for file in self.files:
            for name in self.names_in(file):
                self.location[name] = file

    def _handle(self, file: Path):
        if file not in self._open:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[file] = safe_open(str(file), framework="pt")
            else:  # mmap: a .bin shard is paged in tensor by tensor, not read whole
                self._open[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._open[file]

    def names_in(self, file: Path) -> list[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def names(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self.location[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        handle = self._handle(self.location[name])
        if isinstance(handle, dict):
            return handle[name].dtype
        code = handle.get_slice(name).get_dtype()
        found = [dtype for dtype, c in SAFETENSORS_DTYPES.items() if c == code]
        if not found:
            raise DataError(f"{self.location[name]}: tensor {name!r} has an unsupported dtype {code}")
        return found[0]

    def is_float(self, name: str) -> bool:
        return self.dtype(name).is_floating_point

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self.location[name])
        if isinstance(handle, dict):
            return handle[name].clone()  # a private copy, not a view of the mapped file
        return handle.get_tensor(name)

    def digest(self, name: str) -> str:
        """sha256 of the tensor's bytes as stored (little-endian, row-major). A safetensors tensor is
        streamed from its file in 16 MB reads, never loaded whole; a .bin tensor is hashed from its
        memory map. Both give the same digest for the same values, whatever the file layout."""
        file = self.location[name]
        h = hashlib.sha256()
        if file.suffix != ".safetensors":
            h.update(self.get(name).contiguous().reshape(-1).view(torch.uint8).numpy().data)
            return h.hexdigest()
        with open(file, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            start, end = json.loads(f.read(header_len))[name]["data_offsets"]
            f.seek(8 + header_len + start)
            buf, left = bytearray(min(HASH_CHUNK, end - start)), end - start
            view = memoryview(buf)
            while left:
                n = f.readinto(view[:min(left, len(buf))])
                if not n:
                    raise DataError(f"{file}: ends inside tensor {name!r} (a truncated file?)")
                h.update(view[:n])
                left -= n
        return h.hexdigest()

    def resolve(self, name: str) -> str | None:
        """The name under which this folder holds ``name`` (a tied head is its embedding), or None."""
        if name in self.location:
            return name
        alias = TIED_ALIASES.get(name)
        return alias if alias in self.location else None

    def close(self) -> None:
        self._open.clear()


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` (``end_shard()`` also
    closes one early), then names them ``model-0000i-of-0000N.safetensors`` with an index, or
    ``model.safetensors`` when there is one shard. Tensors are held only until their shard is written."""

    def __init__(self, folder: Path, max_shard_bytes: int | None = None):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_shard_bytes and self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.end_shard()
        tensor = tensor.contiguous()
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in self.pending.values()):
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_shard_streaming(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                            tensors: Iterable[torch.Tensor]) -> None:
        """Write one shard tensor by tensor as ``tensors`` yields them (names, dtypes and shapes known
        up front, for the header), so only one tensor is in memory at a time."""
        self.end_shard()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # the data section starts 8-byte aligned
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for (name, dtype, shape), tensor in zip(entries, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {shape}")
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as the format
        self.shards.append((path, [name for name, _, _ in entries]))
        self.total_bytes += offset

    def end_shard(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.end_shard()
        if not self.shards:
            raise DataError(f"{self.folder}: no tensors to write")
        n = len(self.shards)
        if n == 1:
            final = self.folder / SAFE_WEIGHTS
            os.replace(self.shards[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self.shards, start=1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return finals


# --------------------------------------------------------------------------- delta arithmetic
CHUNK = 1 << 22  # elements per step: float64 temporaries stay at 32 MB whatever the tensor size


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def sub_base(target: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """target - base, computed in float64 and stored as ``dtype``."""
    out = torch.empty(target.shape, dtype=dtype)
    o, t, b = out.view(-1), target.reshape(-1), base.reshape(-1)
    for s in _chunks(o.numel()):
        o[s] = (t[s].double() - b[s].double()).to(dtype)
    return out


def add_delta(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + delta, computed in float64 and rounded once to ``dtype`` (the one rule make_delta
    checks its round trip against)."""
    out = torch.empty(delta.shape, dtype=dtype)
    o, b, d = out.view(-1), base.reshape(-1), delta.reshape(-1)
    for s in _chunks(o.numel()):
        o[s] = (b[s].double() + d[s].double()).to(dtype)
    return out


def tensor_record(reader: WeightReader, name: str) -> str:
    """One line of a weights hash: the tensor's name, dtype, shape and the digest of its bytes."""
    dtype = reader.dtype(name)
    return f"{name}\t{SAFETENSORS_DTYPES.get(dtype, dtype)}\t{list(reader.shape(name))}\t{reader.digest(name)}\n"


def records_hash(records: dict[str, str]) -> str:
    """sha256 over the records in name order: independent of how the tensors are sharded and of
    whether they are in safetensors or .bin files."""
    return hashlib.sha256("".join(records[n] for n in sorted(records)).encode()).hexdigest()


def weights_hash(reader: WeightReader, names: Iterable[str]) -> str:
    """The hash make_delta.py records of the base tensors a delta is added to (``names``), read one
    tensor at a time and each file dropped after its tensors."""
    from tqdm import tqdm

    wanted = set(names)
    records: dict[str, str] = {}
    with tqdm(total=len(wanted), desc="hashing the base", unit="tensor") as bar:
        for file in reader.files:
            for name in reader.names_in(file):
                if name in wanted:
                    records[name] = tensor_record(reader, name)
                    bar.update()
            reader.close()
    return records_hash(records)


def read_delta_info(folder: Path) -> dict | None:
    path = folder / DELTA_INFO
    if not path.is_file():
        return None  # e.g. a delta released without it: resized vocabulary tensors are then whole
    try:
        info = json.loads(path.read_text())
        info["whole_tensors"] = list(info["whole_tensors"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected a JSON object with a 'whole_tensors' list ({e})") from e
    return info
