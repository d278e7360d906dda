"""Big models across devices: accelerate's layer placement, CPU and disk offload.

A model loaded with a ``device_map`` runs under accelerate's hooks: each module's forward moves its
inputs to the device that executes it, and an offloaded module's weights sit on the ``meta`` device
except while it runs (the values live in a CPU dictionary or in files on disk). So lmscope

* feeds inputs to the device that executes the input embeddings (:func:`input_device`);
* moves what it captures to one capture device, the CPU unless asked otherwise (:func:`capture_device`);
* reads weights (``W_O``, ``W_down``, biases) through :func:`tensor_of`, which fetches an offloaded
  tensor from accelerate's weights map instead of reading the ``meta`` placeholder;
* runs modules (final norm, unembedding) by calling them, so accelerate loads their weights.

Tiny and other in-memory models are placed with :func:`place` (``accelerate.dispatch_model``);
models loaded from files pass ``device_map`` to transformers, after :func:`check_placement` has
turned the two usual mistakes (a ``max_memory`` below one layer, an offload folder that cannot
be written) into one-line errors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmscope.errors import LmscopeError

__all__ = [
    "capture_device",
    "check_placement",
    "execution_device",
    "input_device",
    "is_placed",
    "place",
    "tensor_of",
]

_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _hooks(module: nn.Module) -> Iterator[Any]:
    """accelerate's hooks on ``module`` (a ``SequentialHook`` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    yield from getattr(hook, "hooks", (hook,))


def is_placed(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` (a ``device_map``: hooks move tensors between devices)."""
    return bool(getattr(model, "hf_device_map", None)) or any(True for _ in _hooks(model))


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` runs on: accelerate's execution device, else where its weights are."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embeddings' execution device for a placed model."""
    if not is_placed(model):
        return next(model.parameters()).device
    return execution_device(model.get_input_embeddings())


def capture_device(model: nn.Module, asked: str | torch.device | None = None) -> torch.device | None:
    """Where captured tensors are kept: ``asked``, else the CPU for a placed model, else where they are made."""
    if asked is not None:
        return torch.device(asked)
    return torch.device("cpu") if is_placed(model) else None


def tensor_of(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module``'s parameter or buffer ``name`` with its values, wherever accelerate keeps them.

    An offloaded module's tensors are ``meta`` placeholders between forward passes; the values are
    in the hook's weights map (a CPU dictionary, or safetensors/numpy files memory-mapped from disk).
    """
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
        return tensor
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is not None and name in weights:
            return weights[name]
    raise LmscopeError(
        f"the {name} of {type(module).__name__} is offloaded and accelerate keeps no copy lmscope can read: "
        "load the model with a device_map whose offloaded modules are whole layers"
    )


def _size(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        return int(convert_file_size_to_int(value))
    except ValueError as error:
        raise LmscopeError(f"max_memory: {value!r} is not a size (use bytes or a string like '2GiB')") from error


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"


def _largest_layer(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Bytes of the biggest module accelerate will not split (a block), else of the biggest leaf module."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    named = [(n, m) for n, m in model.named_modules() if type(m).__name__ in blocks]
    if not named:
        named = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return max((sizes.get(n, 0) for n, _ in named), default=0)


def check_placement(
    model: nn.Module,
    name: str,
    device_map: Any,
    max_memory: dict[Any, int | str] | None,
    offload_folder: str | os.PathLike[str] | None,
    dtype: torch.dtype | None = None,
) -> None:
    """One-line errors for a placement that cannot work, before any weight moves.

    ``model`` may be an empty (``meta``) instance: only module sizes are read. Offloaded layers are
    loaded onto a device one at a time, so some device that runs layers needs room for one layer.
    """
    if isinstance(device_map, str) and device_map not in _STRATEGIES:
        raise LmscopeError(
            f"device_map {device_map!r} is not a placement: use one of {', '.join(_STRATEGIES)}, "
            "or a dict from module names to devices ('cpu', 'disk', 0, 'cuda:1', ...)"
        )
    if max_memory is not None:
        if device_map is None:
            raise LmscopeError("max_memory needs a device_map (e.g. device_map='auto') to place the layers")
        if not isinstance(max_memory, dict) or not max_memory:
            raise LmscopeError("max_memory must be a dict from devices to sizes, e.g. {'cpu': '2GiB'}")
        budgets = {device: _size(value) for device, value in max_memory.items() if device != "disk"}
        largest = _largest_layer(model, dtype)
        if not budgets or max(budgets.values()) < largest:
            given = ", ".join(f"{d}: {_mib(s)}" for d, s in budgets.items()) or "only disk"
            raise LmscopeError(
                f"max_memory ({given}) is too small to hold one layer of {name} ({_mib(largest)}): offloaded "
                "layers are loaded onto a device one at a time, so raise the limit of at least one device"
            )
    if offload_folder is not None:
        _check_writable(Path(offload_folder).expanduser())


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lmscope-write-test-"):
            pass
    except OSError as error:
        why = error.strerror or type(error).__name__
        raise LmscopeError(f"the offload folder {folder} is not a writable folder ({why}): pass another one") from error


def place(
    model: nn.Module,
    name: str,
    device_map: Any,
    max_memory: dict[Any, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Spread an in-memory model over devices (``accelerate.dispatch_model``), offloading where told.

    ``device_map``: a strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``)
    bounded by ``max_memory``, or a dict from module names to devices, ``"cpu"`` or ``"disk"``.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    check_placement(model, name, device_map, max_memory, offload_folder)
    no_split = list(getattr(model, "_no_split_modules", None) or ())
    if isinstance(device_map, str):
        memory = max_memory
        if device_map != "sequential":
            memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")  # fmt: skip
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict) or not device_map:
        raise LmscopeError("device_map must be a strategy name or a non-empty dict from module names to devices")
    names = dict(model.named_modules())
    unknown = [key for key in device_map if key and key not in names]
    if unknown:
        raise LmscopeError(f"device_map names modules {name} does not have: {', '.join(map(str, unknown[:5]))}")
    if "" in device_map and len(device_map) == 1:  # the whole model on one device: name its parts
        device_map = {child: device_map[""] for child, _ in model.named_children()}
    if "disk" in device_map.values() and offload_folder is None:
        raise LmscopeError(f"the device_map offloads parts of {name} to disk: pass offload_folder= to keep them in")
    tensors = list(model.state_dict())  # tied weights included, under each name
    missing = [t for t in tensors if not any(not k or t == k or t.startswith(f"{k}.") for k in device_map)]
    if missing:
        raise LmscopeError(f"the device_map gives no device for {missing[0]} (and {len(missing) - 1} more tensors)")
    folder = None
    if "disk" in device_map.values():
        # A folder of its own: accelerate reuses any offloaded weights it finds in the folder it is given.
        folder = tempfile.mkdtemp(dir=Path(offload_folder).expanduser(), prefix="lmscope-offload-")
    try:
        model = dispatch_model(model, device_map=device_map, offload_dir=folder)
    except (OSError, ValueError) as error:  # a full disk; accelerate's checks of the map
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # no partial offload left behind
        if isinstance(error, OSError):
            raise LmscopeError(f"could not offload {name} to {offload_folder}: {error.strerror or error}") from error
        raise LmscopeError(f"{name} could not be placed: {str(error).splitlines()[0]}") from error
    model.hf_device_map = dict(device_map)
    if folder is not None:
        weakref.finalize(model, shutil.rmtree, folder, True)  # the offloaded copy lives as long as the model
    return model
