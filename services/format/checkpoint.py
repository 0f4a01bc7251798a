"""Reading Hugging Face safetensors checkpoints tensor by tensor.

A checkpoint is a directory holding config.json and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Nothing is read until asked for:
a caller that needs one expert opens only the shard(s) holding that expert's tensors.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.errors import CheckpointError, ExpertmeshError
from services.format.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
# bytes per element of the safetensors dtypes, to check each tensor's byte range against its shape
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file (shard or index) that cannot be read as what it claims to be. Names the file."""

    def __init__(self, file: str | Path, message: str):
        self.file = str(file)
        self.tensor = None
        ExpertmeshError.__init__(self, f"checkpoint file {file}: {message}")


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor entries ({name: {dtype, shape, data_offsets}}) of one safetensors file, checked against the
    file itself: a header length that fits in the file, a JSON object for a header, and every tensor's bytes
    inside the file and as many as its shape and dtype need. Reads only the header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(path, f"{size} bytes, too short for a safetensors header: truncated?")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CorruptCheckpointError(
                    path,
                    f"header length {length} runs past the end of the file ({size} bytes): truncated, or not a "
                    "safetensors file",
                )
            raw = f.read(length)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"cannot read it: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, f"the header is not JSON ({exc}): not a safetensors file?") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, f"the header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - length
    tensors: dict[str, dict] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _checked_entry(path, name, entry, data_bytes)
    return tensors


def _checked_entry(path: Path, name: str, entry, data_bytes: int) -> dict:
    def bad(message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(path, f"tensor {name!r}: {message}")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"no dtype in the header (got {dtype!r})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_bytes:
        raise bad(
            f"data [{begin}, {end}) lies outside the file, which holds {data_bytes} bytes of tensor data: truncated?"
        )
    itemsize = _DTYPE_BYTES.get(dtype)
    needed = math.prod(shape) * (itemsize or 0)
    if itemsize is not None and end - begin != needed:
        raise bad(f"{end - begin} bytes of data for shape {shape} of {dtype}, which needs {needed}")
    return entry


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str


class CheckpointReader:
    """Lazy access to the tensors of one checkpoint directory.

    `opened_files` records every shard opened, so tests (and operators) can see what a load touched.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError("(directory)", f"no checkpoint directory at {self.directory}")
        try:
            self.config = ModelConfig.from_file(self.directory)
        except UnicodeDecodeError as exc:  # config.py reads it as text and lets this one through
            where = f"{exc.reason} at byte {exc.start}"
            raise CorruptCheckpointError(self.directory / "config.json", f"not UTF-8 text ({where})") from None
        self._weight_map = self._read_weight_map()
        self._handles: dict[str, object] = {}
        self._names_by_file: dict[str, list[str]] | None = None
        self._stack = ExitStack()
        self.opened_files: list[str] = []

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptCheckpointError(index, f"malformed index: {type(exc).__name__}: {exc}") from None
            if not (
                isinstance(weight_map, dict)
                and all(isinstance(n, str) and isinstance(f, str) and f for n, f in weight_map.items())
            ):
                raise CorruptCheckpointError(
                    index, "malformed index: weight_map is not an object of tensor name -> shard file name"
                )
            for name, file in weight_map.items():
                if not (self.directory / file).is_file():
                    raise CheckpointError(name, f"index points at missing shard {file!r}")
            return dict(weight_map)
        single = self.directory / SINGLE_FILE
        if not single.exists():
            raise CheckpointError("(weights)", f"neither {INDEX_FILE} nor {SINGLE_FILE} in {self.directory}")
        return {name: SINGLE_FILE for name in read_safetensors_header(single)}

    # ---- access ----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def names(self) -> list[str]:
        return list(self._weight_map)

    def _handle(self, file: str, wanted: str | None = None):
        """The open shard `file`, checked on first use: CorruptCheckpointError names a truncated or corrupt one,
        CheckpointError a tensor (`wanted` first) that the index puts in it and it does not hold."""
        if file not in self._handles:
            path = self.directory / file
            held = read_safetensors_header(path)
            if self._names_by_file is None:
                self._names_by_file = {}
                for name, mapped in self._weight_map.items():
                    self._names_by_file.setdefault(mapped, []).append(name)
            missing = [name for name in self._names_by_file.get(file, []) if name not in held]
            if missing:
                name = wanted if wanted in missing else missing[0]
                more = f" (nor {len(missing) - 1} more tensors the index puts there)" if len(missing) > 1 else ""
                raise CheckpointError(name, f"the index puts it in {file}, which does not hold it{more}")
            try:
                handle = self._stack.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise CorruptCheckpointError(path, str(exc)) from exc
            self._handles[file] = handle
            self.opened_files.append(file)
        return self._handles[file]

    def info(self, name: str) -> TensorInfo:
        file = self._file_of(name)
        try:
            sl = self._handle(file, name).get_slice(name)
        except SafetensorError as exc:
            raise CorruptCheckpointError(self.directory / file, f"tensor {name!r}: {exc}") from exc
        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(name, f"unsupported safetensors dtype {sl.get_dtype()}")
        return TensorInfo(name, tuple(sl.get_shape()), dtype, file)

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[torch.dtype, ...] | None = None
    ) -> torch.Tensor:
        """Read one tensor, checking its shape and dtype when given. Errors name the tensor."""
        file = self._file_of(name)
        try:
            tensor = self._handle(file, name).get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CorruptCheckpointError(self.directory / file, f"tensor {name!r}: {exc}") from exc
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(name, f"expected shape {list(shape)}, found {list(tensor.shape)} in {file}")
        if dtypes is not None and tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(name, f"expected dtype {allowed}, found {str(tensor.dtype).removeprefix('torch.')}")
        return tensor

    def _file_of(self, name: str) -> str:
        try:
            return self._weight_map[name]
        except KeyError:
            raise CheckpointError(name, f"missing from the checkpoint in {self.directory}") from None

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
