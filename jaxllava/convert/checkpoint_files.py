"""transformers checkpoint files: reading them tensor by tensor, writing them shard by shard.

Reads `model.safetensors`, sharded `model.safetensors.index.json`, and
`pytorch_model.bin` (+ sharded index) when torch is installed. Tensors are read
lazily so a loader can stream them into the model one at a time (peak host
memory stays near one copy of the model).

bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (numpy has no bfloat16
of its own and safetensors' numpy reader rejects them), from both formats, so the
caller sees the stored dtype and converts exactly.

`save_sharded_safetensors` is the one writer: every export streams through it.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from jaxllava.errors import ConversionError


class CheckpointTensors:
    """Lazy name → numpy access to the tensors of a transformers checkpoint directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self._file_of: dict[str, str] = {}
        self._format = None
        self._torch_cache: tuple[str, dict] | None = None  # the last .bin file read (one at a time)
        candidates = [
            ("model.safetensors.index.json", "safetensors"),
            ("model.safetensors", "safetensors"),
            ("pytorch_model.bin.index.json", "torch"),
            ("pytorch_model.bin", "torch"),
        ]
        for name, fmt in candidates:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                continue
            self._format = fmt
            if name.endswith(".index.json"):
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
                self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
            else:
                self._file_of = {k: path for k in self._keys_of_file(path)}
            break
        if self._format is None:
            raise ConversionError(f"{directory}: no model.safetensors, model.safetensors.index.json, "
                                  f"pytorch_model.bin or pytorch_model.bin.index.json found")

    def _keys_of_file(self, path: str) -> list[str]:
        if not os.path.exists(path):
            raise ConversionError(f"{path}: file named by the checkpoint index is missing")
        if self._format == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        return list(self._torch_load(path).keys())

    def _torch_load(self, path: str) -> dict:
        if self._torch_cache is None or self._torch_cache[0] != path:
            try:
                import torch
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ConversionError(f"{path}: reading .bin checkpoints needs torch installed") from e
            try:
                # weights_only: a pickle can run code when loaded; only tensors and plain containers pass.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's protocol warnings would precede our one-line error
                    loaded = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                # torch's own message suggests weights_only=False, which would run the file's code: not repeated.
                detail = next((line.strip() for line in str(e).splitlines() if "Unpickler error" in line), "")
                raise ConversionError(f"{path}: refused to load: it holds objects other than tensors (a pickle that "
                                      f"could run code when loaded){'; ' + detail if detail else ''}") from None
            except (OSError, RuntimeError, EOFError, ValueError) as e:
                raise ConversionError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") \
                    from None
            if not isinstance(loaded, dict):
                raise ConversionError(f"{path}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
            self._torch_cache = (path, loaded)
        return self._torch_cache[1]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._file_of:
            raise ConversionError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        path = self._file_of[name]
        if not os.path.exists(path):
            raise ConversionError(f"{path}: file holding tensor {name!r} is missing")
        if self._format == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="numpy") as f:
                if f.get_slice(name).get_dtype() == "BF16":
                    return _read_bf16_safetensor(path, name)
                return f.get_tensor(name)
        tensor = self._torch_load(path)[name]
        if str(tensor.dtype) == "torch.bfloat16":
            import torch
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._file_of:
            yield name, self[name]


def _read_bf16_safetensor(path: str, name: str) -> np.ndarray:
    """One bfloat16 tensor of a safetensors file: 8-byte little-endian header size, JSON
    header with dtype/shape/data_offsets, then the raw data (the documented format)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(entry["shape"])


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{path}: config.json is missing")
    with open(path) as f:
        return json.load(f)


def save_sharded_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: str, *,
                             max_shard_bytes: int = 1 << 30) -> list[str]:
    """Write tensors as transformers does: `model.safetensors`, or shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`. Only one shard is
    held in memory at a time, so an export peaks near one copy of the model. Returns the names."""
    from safetensors.numpy import save_file

    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            # transformers reads a safetensors file only when its metadata says format "pt"
            save_file(pending, os.path.join(directory, f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, size = {}, 0

    for name, array in tensors:
        if size and size + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(directory, "shard-00000.tmp"), os.path.join(directory, "model.safetensors"))
        return shards[0]
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(directory, f"shard-{k:05d}.tmp"), os.path.join(directory, file))
        weight_map.update({name: file for name in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return list(weight_map)
