"""Minibatches for the engine: in-memory tensors sliced on the device, or a user's iterable.

The calling convention shared by the engine, every model and every guide:

    model(*args, size=N, subsample=idx, **kwargs)

where ``args``/``kwargs`` are the minibatch in the structure the user gave (a tensor becomes
one positional argument, a tuple several, a dict keyword arguments), ``size`` is the number
of examples in the *whole* dataset and ``subsample`` is a LongTensor with the minibatch's
row indices (on the data's device). A model opens its data plate as

    with pyro.plate("data", size, subsample=subsample): ...

so Pyro scales every site inside the plate by ``size / len(subsample)`` and the ELBO of a
model with global latents stays unbiased. Called directly with full data, ``size`` and
``subsample`` default to ``None``; models then use ``size or len(x)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Data = torch.Tensor | tuple | list | Mapping | Iterable


@dataclass
class Batch:
    """One minibatch in call form: ``fn(*args, size=size, subsample=subsample, **kwargs)``."""

    args: tuple
    kwargs: dict
    size: int
    subsample: torch.Tensor

    def call(self, fn, **extra):
        return fn(*self.args, size=self.size, subsample=self.subsample, **self.kwargs, **extra)

    def __len__(self) -> int:
        return len(self.subsample)


def split_structure(data: Any) -> tuple[tuple, dict]:
    """Turn a tensor / tuple of tensors / dict of tensors into ``(args, kwargs)`` (a
    TensorDataset gives its tensors, as a DataLoader over it does)."""
    if isinstance(data, torch.Tensor):
        return (data,), {}
    if isinstance(data, torch.utils.data.TensorDataset):
        return tuple(data.tensors), {}
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    if isinstance(data, Mapping):
        return (), dict(data)
    raise TypeError(
        f"data must be a tensor, a tuple of tensors or a dict of tensors, got {type(data).__name__}"
    )


def is_in_memory(data: Any) -> bool:
    if isinstance(data, torch.utils.data.TensorDataset):
        return True
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(t, torch.Tensor) for t in data)
    if isinstance(data, Mapping):
        return len(data) > 0 and all(isinstance(t, torch.Tensor) for t in data.values())
    return False


class TensorBatches:
    """In-memory data, moved to ``device`` once and sliced per minibatch with a shuffled index.

    Every tensor's first dimension indexes examples; all must agree. Float tensors are checked
    for NaN/inf here, before any training step, and the error names the offending field.
    A sparse tensor (CSR or COO, e.g. document-term counts) is kept sparse on the device and
    each minibatch's rows are densified there (``take``), or with ``sparse_rows`` handed to
    the model and guide as a CSR minibatch (they must accept one: the topic models do); on
    a GPU, one whose dense form fits in 2 GiB is densified once instead (:func:`keeps_sparse`).
    """

    def __init__(self, data: Any, batch_size: int, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = False, name: str = "data",
                 sparse_rows: bool = False):
        args, kwargs = split_structure(data)
        fields = [(f"{name}[{i}]", t) for i, t in enumerate(args)]
        fields += [(f"{name}[{k!r}]", t) for k, t in kwargs.items()]
        if not fields:
            raise ValueError(f"{name} is empty: give at least one tensor")
        sizes = {label: int(t.shape[0]) if t.dim() else None for label, t in fields}
        if None in sizes.values():
            bad = [k for k, v in sizes.items() if v is None]
            raise ValueError(f"{bad[0]} is a 0-d tensor; the first dimension must index examples")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{name}: first dimensions disagree: {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if self.num_examples == 0:
            raise ValueError(f"{name} has no examples")
        for label, t in fields:
            if t.layout == torch.sparse_coo:  # sparse rows are sliced in CSR form
                t = t.coalesce().to_sparse_csr()
            if t.layout == torch.sparse_csr:
                if t.is_floating_point() and not bool(torch.isfinite(t.values()).all()):
                    bad = int((~torch.isfinite(t.values())).nonzero()[0])
                    row = int(torch.searchsorted(t.crow_indices(), bad, right=True)) - 1
                    raise ValueError(f"{label} contains NaN or inf (first in row {row})")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                raise ValueError(f"{label} contains NaN or inf (first at index {bad})")
        device = torch.device(device)
        pin = device.type == "cuda"
        self.args = tuple(_to(t, device, pin) for t in args)
        self.kwargs = {k: _to(t, device, pin) for k, t in kwargs.items()}
        self.device = device
        self.batch_size = min(int(batch_size), self.num_examples)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.sparse_rows = sparse_rows
        self.generator = torch.Generator()

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def take(self, idx: torch.Tensor) -> Batch:
        dense = not self.sparse_rows
        return Batch(tuple(take_rows(t, idx, dense) for t in self.args),
                     {k: take_rows(t, idx, dense) for k, t in self.kwargs.items()},
                     self.num_examples, idx)

    def __iter__(self) -> Iterator[Batch]:
        n = self.num_examples
        if self.shuffle and self.batch_size < n:  # one full batch keeps the rows in order:
            # Pyro indexes per-row parameters only when a plate's subsample is shorter than
            # its size, so a permuted full batch would pair them with the wrong rows
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            yield self.take(order[i * self.batch_size:(i + 1) * self.batch_size])


class IterableBatches:
    """A user's iterable (e.g. a DataLoader) of ready-made minibatches, streamed to the device.

    ``size`` is the number of examples in the whole dataset (default: ``len(loader.dataset)``).
    ``subsample`` is given as the positions of the rows within the epoch; they are not dataset
    ids, so guides with per-example parameters need in-memory data.
    """

    def __init__(self, loader: Iterable, device: torch.device | str = "cpu",
                 num_data: int | None = None):
        if num_data is None:
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError(
                    "streamed data (a DataLoader without a sized dataset, an iterable or a "
                    "list of minibatches) needs the number of examples in the whole dataset "
                    "so that minibatch ELBOs are scaled right: fit(..., num_data=N); elbo, "
                    "log_likelihood and to_arviz take the data as one tensor, tuple or dict "
                    "(or a DataLoader over a dataset with a length)")
            num_data = len(dataset)
        self.loader = loader
        self.device = torch.device(device)
        self.num_examples = int(num_data)
        self.generator = torch.Generator()  # unused; kept so checkpoints look the same

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        start = 0
        pin = self.device.type == "cuda"
        for item in self.loader:
            args, kwargs = split_structure(item)
            args = tuple(_to(t, self.device, pin) for t in args)
            kwargs = {k: _to(t, self.device, pin) for k, t in kwargs.items()}
            first = args[0] if args else next(iter(kwargs.values()))
            b = int(first.shape[0])
            yield Batch(args, kwargs, self.num_examples,
                        torch.arange(start, start + b, device=self.device))
            start += b


def make_batches(data: Data, batch_size: int, device: torch.device | str, shuffle: bool = True,
                 drop_last: bool = False, num_data: int | None = None, name: str = "data",
                 sparse_rows: bool = False):
    """Wrap ``data`` for the engine: tensors stay on the device, iterables are streamed;
    ``sparse_rows``: sparse tensors reach the model as CSR minibatches (:class:`TensorBatches`)."""
    if is_in_memory(data):
        return TensorBatches(data, batch_size, device, shuffle=shuffle, drop_last=drop_last,
                             name=name, sparse_rows=sparse_rows)
    _refuse_arrays(data, name)
    if isinstance(data, (tuple, list)) and any(isinstance(v, Mapping) for v in data) \
            and not all(isinstance(v, Mapping) for v in data):
        kinds = ", ".join(type(v).__name__ for v in data)
        raise ValueError(
            f"{name} is a {type(data).__name__} of ({kinds}): the engine reads a dict as "
            "keyword arguments (model(x=..., y=...)) and a tuple as positional tensors with "
            "one row per example, and cannot slice a dict inside a tuple into rows: give "
            "the tensors as one tuple (model(x, y)) or as one dict (model(x=..., y=...)), "
            "and bind constants with functools.partial(model, n=...)")
    _refuse_non_tensor_entries(data, name)
    _refuse_plain_python(data, name)
    if isinstance(data, Iterable):
        if num_data is None and isinstance(data, (tuple, list)) and len(data) == 1 \
                and isinstance(data[0], Mapping):
            raise ValueError(
                f"{name} is a {type(data).__name__} holding one dict: the engine reads a list "
                "or tuple of dicts as ready-made minibatches (fit(..., num_data=N) trains "
                "on them), and a dict as keyword arguments (model(x=..., y=...)); a model "
                "that takes the dict as one argument (model(batch)) cannot be sliced into "
                "rows: write it as model(x, y) and pass the dict itself")
        return IterableBatches(data, device, num_data=num_data)
    raise TypeError(f"{name}: cannot make minibatches from {type(data).__name__}; give a tensor, "
                    "a tuple or dict of tensors (rows = examples) or a DataLoader")


def _refuse_arrays(data: Any, name: str) -> None:
    """NumPy arrays (or pandas columns) where tensors belong would otherwise be taken for a
    stream of minibatches (which needs num_data=); say to convert them."""
    entries = (list(data.items()) if isinstance(data, Mapping) else
               list(enumerate(data)) if isinstance(data, tuple) else [(None, data)])
    for key, value in entries:
        if not isinstance(value, torch.Tensor) and hasattr(value, "__array__") \
                and hasattr(value, "shape"):
            where = name if key is None else f"{name}[{key!r}]"
            raise ValueError(
                f"{where} is a {type(value).__module__.split('.')[0]} "
                f"{type(value).__name__}, not a torch tensor; the engine takes tensors (one "
                "row per example): pass torch.as_tensor(x, dtype=torch.float32) (integer "
                "labels: dtype=torch.long)")


def _refuse_plain_python(data: Any, name: str) -> None:
    """An empty container, or a list of numbers, would otherwise be taken for a stream of
    minibatches (which needs num_data=); say what is wrong with it."""
    if isinstance(data, (tuple, list, Mapping)) and len(data) == 0:
        raise ValueError(f"{name} is an empty {type(data).__name__}: give at least one tensor "
                         "(one row per example)")
    if isinstance(data, (tuple, list)) and _numbers(data):
        raise ValueError(f"{name} is a Python {type(data).__name__} of numbers, not a torch "
                         "tensor; the engine takes tensors (one row per example): pass "
                         "torch.tensor(x, dtype=torch.float32)")


def _numbers(value: Any) -> bool:
    """Whether ``value`` is a number or a (nested) list or tuple of numbers only."""
    if isinstance(value, (tuple, list)):
        return all(_numbers(v) for v in value)
    return isinstance(value, (int, float, bool))


def _refuse_non_tensor_entries(data: Any, name: str) -> None:
    """A dict (keyword arguments) or tuple (positional ones) of rows that also holds a
    non-tensor (an int ``num_classes``, None) would otherwise be taken for a stream of
    minibatches; say which entry and how to pass it."""
    if isinstance(data, Mapping):
        items = [(repr(k), k, v) for k, v in data.items()]
    elif isinstance(data, tuple):
        items = [(f"[{i}]", None, v) for i, v in enumerate(data)]
    else:
        return
    if not any(isinstance(v, torch.Tensor) for _, _, v in items):
        return
    label, key, value = next(t for t in items if not isinstance(t[2], torch.Tensor))
    bind = (f"functools.partial(model, {key}=...) and the same for the guide"
            if isinstance(key, str) else "functools.partial (or a default argument)")
    raise ValueError(
        f"{name}{label if key is None else '[' + label + ']'} is of type {type(value).__name__}, "
        f"not a tensor with one row per example; the engine slices every entry of the data "
        f"into minibatches, so pass a constant to the model and guide another way: {bind}")


def take_rows(t: torch.Tensor, idx: torch.Tensor, dense: bool = True) -> torch.Tensor:
    """Rows ``idx`` of ``t``; a sparse CSR tensor (N, D) gives a dense (len(idx), D) tensor,
    so only the minibatch is ever densified (on the data's device), or with ``dense=False``
    a CSR tensor (len(idx), D) of those rows."""
    if t.layout != torch.sparse_csr:
        return t.index_select(0, idx)
    crow, col, values = t.crow_indices(), t.col_indices(), t.values()
    starts, ends = crow[idx], crow[idx + 1]
    lengths = ends - starts
    rows = torch.repeat_interleave(torch.arange(len(idx), device=t.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths  # where each row starts in the gathered list
    offsets = torch.arange(int(lengths.sum()), device=t.device) - first[rows] + starts[rows]
    if not dense:
        crow_out = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        return torch.sparse_csr_tensor(crow_out, col[offsets], values[offsets],
                                       (len(idx), *t.shape[1:]), check_invariants=False)
    out = torch.zeros(len(idx), *t.shape[1:], dtype=t.dtype, device=t.device)
    out[rows, col[offsets]] = values[offsets]
    return out


DENSE_ON_GPU_BYTES = 2**31  # sparse data up to this dense size is densified once on a GPU


def keeps_sparse(t: torch.Tensor, device: torch.device) -> bool:
    """Whether sparse data stays sparse on ``device``. Gathering sparse rows needs one host
    read per minibatch (the rows' entry count), which stalls a GPU's queue; so on a GPU a
    matrix whose dense form takes at most ``DENSE_ON_GPU_BYTES`` (2 GiB: DBLP's 54k x 1513
    counts take 0.33 GB) is densified once instead. On CPU it always stays sparse."""
    if device.type != "cuda":
        return True
    return t.shape.numel() * t.element_size() > DENSE_ON_GPU_BYTES


def _to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    t = t.detach()  # data, not a leaf of the user's graph: no gradients written into it
    if t.layout == torch.sparse_coo:
        t = t.coalesce().to_sparse_csr()
    if t.layout == torch.sparse_csr:
        if not keeps_sparse(t, device):
            return t.to(device).to_dense()
        return t if t.device == device else t.to(device)
    if t.device == device:
        return t
    if pin and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()  # DataLoader(pin_memory=True) hands over pinned rows already
    return t.to(device, non_blocking=pin)
