"""The traffic model: bytes an eager computation reads and writes, counted op by op, without a GPU.

Normalizers are memory-bound: on a GPU each eager op is one pass over its operands, so what an op
reads and writes is what it costs. :func:`count_traffic` runs a function under a ``TorchDispatchMode``
and adds up, for every aten op the dispatcher runs (forward and the autograd backward alike):

* **read**: every tensor argument the op does not only overwrite (an ``out=`` argument is written, not
  read; an in-place op's ``self`` is read and written, except ``fill_``/``zero_``/``copy_``, which only
  write it);
* **written**: every argument the op writes (``out=``, in-place ``self``) and every tensor it returns
  that is not one of its arguments;
* a tensor's bytes are its *distinct* elements times the element size: a broadcast (stride-0) dimension
  is loaded once, as a kernel would;
* views (``view``, ``slice``, ``transpose``, ``detach``, ...) and allocations (``empty*``) move nothing.

No cache is modelled: an operand that a CPU would find in cache still counts, as it would on a GPU
where every op streams its operands from memory. A fused kernel is counted from what it loads and
stores instead (``lra_dtn.dtn.fused.traffic_bytes``), since the dispatcher sees it as one opaque op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Ops that allocate without touching memory.
ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
               "aten::new_empty_strided"}
#: In-place ops that overwrite ``self`` without reading it.
OVERWRITES = {"aten::fill_", "aten::zero_", "aten::copy_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements times element size: an expanded (stride-0) dimension counts once."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


@dataclass
class Traffic:
    """Bytes read and written, and how many data-moving ops moved them (per op name in ``by_op``)."""

    read: int = 0
    written: int = 0
    ops: int = 0
    by_op: dict[str, list[int]] = field(default_factory=dict)  # name -> [calls, read, written]

    @property
    def total(self) -> int:
        return self.read + self.written

    def add(self, name: str, read: int, written: int) -> None:
        self.read, self.written, self.ops = self.read + read, self.written + written, self.ops + 1
        entry = self.by_op.setdefault(name, [0, 0, 0])
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + read, entry[2] + written


class _Counter(TorchDispatchMode):
    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in ALLOCATIONS:
            return out
        read = written = 0
        arguments = set()
        for schema_arg, value in _bound_arguments(func, args, kwargs):
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            is_write = schema_arg.alias_info is not None and schema_arg.alias_info.is_write
            for t in tensors:
                arguments.add(id(t))
                if is_write:
                    written += tensor_bytes(t)
                if not is_write or not (schema_arg.kwarg_only or name in OVERWRITES):
                    read += tensor_bytes(t)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in arguments:
                written += tensor_bytes(t)
        self.traffic.add(name, read, written)
        return out


def _bound_arguments(func, args, kwargs):
    """``(schema argument, value)`` for every argument given, positional or keyword."""
    schema_args = func._schema.arguments
    for schema_arg, value in zip(schema_args, args):
        yield schema_arg, value
    by_name = {a.name: a for a in schema_args}
    for key, value in kwargs.items():
        yield by_name[key], value


def count_traffic(fn: Callable[[], object]) -> Traffic:
    """Run ``fn()`` and count the bytes every aten op it runs reads and writes (see the module rule)."""
    traffic = Traffic()
    with _Counter(traffic):
        fn()
    return traffic
