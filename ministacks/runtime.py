"""Process and module state: the allocator policy a command sets once, and a model's train/eval state.

- `keep_freed_memory()`: called once by the command line before any work.
- `training_state(model, training)`: a block in which the model is in train (or eval) mode, with the
  mode it had before put back afterwards, even if the block raised. Every evaluation inside a training
  loop runs in one: the loss, the router's features, the null-space directions. Frozen stacks keep
  their own rule inside it (stacks.layer.StackedLinear.train: frozen stays eval), because switching is
  always done with `model.train(mode)`.
- `process_group()`: this process's rank and the world size when torch.distributed runs it (torchrun),
  (0, 1) otherwise: what the training round splits its batch by.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Every training step allocates and frees the same large tensors (the [B*T, V] logits, their
    log-softmax and gradient: 64 MiB each at the default size). glibc serves blocks that large with
    fresh mmap pages and unmaps them on free, so each step pays page faults to touch them again
    (visible in the profiler as a 30 ms `fill_` of the loss gradient). With mmap off and a high trim
    threshold the heap keeps those pages: ~5% more tokens/s here. It changes the allocator policy of
    the whole process (the price is memory not returned to the OS), so call it from scripts, not
    libraries. Returns False, doing nothing, where glibc is not the allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


@contextmanager
def training_state(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`model.train(training)` inside the block; the model's previous mode after it."""
    was = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process in an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
