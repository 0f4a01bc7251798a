"""Reading Hugging Face safetensors checkpoints tensor by tensor.

A checkpoint is a directory holding config.json and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Nothing is read until asked for:
a caller that needs one expert opens only the shard(s) holding that expert's tensors.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from services.format.config import ModelConfig
from services.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
}


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
        self.config = ModelConfig.from_file(self.directory)
        self._weight_map = self._read_weight_map()
        self._handles: dict[str, object] = {}
        self._stack = ExitStack()
        self.opened_files: list[str] = []

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(INDEX_FILE, f"malformed index: {exc}") from exc
            for name, file in weight_map.items():
                if not (self.directory / file).exists():
                    raise CheckpointError(name, f"index points at missing shard {file!r}")
            return dict(weight_map)
        single = self.directory / SINGLE_FILE
        if not single.exists():
            raise CheckpointError("(weights)", f"neither {INDEX_FILE} nor {SINGLE_FILE} in {self.directory}")
        with safe_open(single, framework="pt") as f:  # reads only the header
            return {name: SINGLE_FILE for name in f.keys()}

    # ---- access ----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def names(self) -> list[str]:
        return list(self._weight_map)

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(self.directory / file, framework="pt"))
            self.opened_files.append(file)
        return self._handles[file]

    def info(self, name: str) -> TensorInfo:
        file = self._file_of(name)
        sl = self._handle(file).get_slice(name)
        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(name, f"unsupported safetensors dtype {sl.get_dtype()}")
        return TensorInfo(name, tuple(sl.get_shape()), dtype, file)

    def get(self, name: str, shape: tuple[int, ...] | None = None,
            dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
        """Read one tensor, checking its shape and dtype when given. Errors name the tensor."""
        file = self._file_of(name)
        tensor = self._handle(file).get_tensor(name)
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

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
