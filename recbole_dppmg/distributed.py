"""Multi-process data-parallel training on RecBole's own torch.distributed path.

RecBole 1.2.1 trains data-parallel when the config holds ``local_rank`` (with ``nproc``,
``world_size``, ``ip``, ``port``, ``offset``): ``Config`` joins the process group, the
dataloaders shard batches with a ``DistributedSampler`` (each rank gets
``train_batch_size / world_size``), the ``Trainer`` wraps the model in
``DistributedDataParallel`` and averages evaluation metrics over the ranks. Its
``run_recbole`` spawns the ranks with ``torch.multiprocessing``; ``launch`` does the same for
``recbole_dppmg.quick_start.run``. ``recbole_dppmg.compat`` makes the backend configurable
(``dist_backend``), since RecBole hard-codes NCCL, which needs one GPU per rank.

Every rank holds the whole graph and the whole model; DDP averages gradients, and
``sync_*`` below keep non-gradient state (the quantizer's codebooks and EMA statistics)
identical on every rank. They do nothing in a single process.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from recbole_dppmg.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
# Config keys of a multi-process run; none of them describes what was trained.
DIST_KEYS = ("nproc", "world_size", "ip", "port", "offset", "dist_backend", "local_rank")


def resolve_backend(name: str | None, cuda: bool) -> str:
    """``dist_backend`` -> a torch.distributed backend: ``auto`` is NCCL on CUDA, gloo on CPU."""
    name = "auto" if name is None else str(name).lower()
    if name not in BACKENDS:
        raise ConfigError(f"dist_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise ConfigError("dist_backend nccl needs CUDA devices (use gloo, or auto, on CPU)")
    return name


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def sync_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (statistics of every rank's batch)."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@torch.no_grad()
def sync_from_rank0_(*tensors: torch.Tensor) -> None:
    """Overwrite each tensor, in place, with rank 0's value (state chosen by one rank)."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


@torch.no_grad()
def average_sparse_grads_(params: list[torch.Tensor]) -> None:
    """Replace each parameter's sparse (row) gradient with its mean over the ranks, using only
    dense all-gathers. DDP leaves these tables to us: gloo's sparse all-reduce inside DDP's
    reducer aborted 2-process runs with heap corruption (pytorch/pytorch#111422, #87497 report
    it fragile), and NCCL has no sparse all-reduce at all. Each rank contributes its coalesced
    rows; every rank sums the same gathered rows in the same order, so all get the same result.
    A rank whose table has no gradient contributes no rows (every rank must call this)."""
    if not is_distributed() or not params:
        return
    world = dist.get_world_size()
    grads = [p.grad.coalesce() if p.grad is not None else None for p in params]
    device = params[0].device
    counts = torch.tensor([0 if g is None else g._nnz() for g in grads], dtype=torch.long, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    widths = counts.new_tensor([p[0].numel() for p in params])  # floats per row
    most = torch.stack(all_counts).max(dim=0).values  # rows per table, padded to the largest rank's
    rows = torch.zeros(int(most.sum()), dtype=torch.long, device=device)
    values = torch.zeros(int((most * widths).sum()), dtype=params[0].dtype, device=device)
    row_at = torch.cumsum(most, 0) - most
    value_at = torch.cumsum(most * widths, 0) - most * widths
    for t, g in enumerate(grads):
        if g is not None and g._nnz():
            n = g._nnz()
            rows[row_at[t] : row_at[t] + n] = g.indices()[0]
            values[value_at[t] : value_at[t] + n * widths[t]] = g.values().reshape(-1)
    gathered_rows = [torch.empty_like(rows) for _ in range(world)]
    gathered_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered_rows, rows)
    dist.all_gather(gathered_values, values)
    for t, p in enumerate(params):
        if grads[t] is None and not any(int(c[t]) for c in all_counts):
            continue  # no rank touched this table
        ids, vals = [], []
        for r in range(world):
            n = int(all_counts[r][t])
            ids.append(gathered_rows[r][row_at[t] : row_at[t] + n])
            vals.append(gathered_values[r][value_at[t] : value_at[t] + n * widths[t]].view(n, *p.shape[1:]))
        ids = torch.cat(ids)
        p.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), torch.cat(vals) / world, p.shape).coalesce()


def broadcast_object(value, src: int = 0):
    """``value`` as rank ``src`` has it (e.g. a run folder chosen by rank 0)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the checkpoint the others load)."""
    if is_distributed():
        dist.barrier()


def wants_launch(config) -> bool:
    """A multi-process run was asked for (``nproc`` > 1) and this is not yet one of its ranks."""
    nproc = config["nproc"] or 1
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be a positive integer, got {nproc!r}")
    return nproc > 1 and config["single_spec"]


def free_port() -> int:
    """A TCP port nobody listens on now (single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_settings(config, port: int) -> dict:
    """The config overrides shared by every rank of the run (each adds its ``local_rank``)."""
    nproc = int(config["nproc"])
    world_size = config["world_size"]
    return {
        "nproc": nproc,
        "world_size": nproc if world_size in (None, -1) else int(world_size),
        "ip": config["ip"] or "localhost",
        "port": port,
        "offset": int(config["offset"] or 0),
        "dist_backend": config["dist_backend"] or "auto",
    }


def _rank_main(
    local_rank: int, fn: Callable, args: tuple, kwargs: dict, config_dict: dict, settings: dict, queue
) -> None:
    """One spawned rank: run ``fn`` with its rank settings; rank 0 hands back the result."""
    rank_config = {**config_dict, **settings, "local_rank": local_rank}
    try:
        result = fn(*args, config_dict=rank_config, **kwargs)
        if local_rank + settings["offset"] == 0:
            queue.put(result)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_shared_dirs(config) -> None:
    """Create the folders every rank (or every run of a parallel comparison or grid) would create:
    RecBole's ``ensure_dir`` checks, then creates, so two processes racing on a fresh
    ``checkpoint_dir`` or log folder crash one of them."""
    Path(config["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)
    Path("log", str(config["model"])).mkdir(parents=True, exist_ok=True)  # init_logger's ./log/<model>


def launch(fn: Callable, config, args: tuple, kwargs: dict, config_dict: dict | None):
    """Spawn ``nproc`` ranks that each call ``fn(*args, config_dict=..., **kwargs)`` (as
    RecBole's ``run`` does for ``run_recbole``); returns rank 0's result."""
    import torch.multiprocessing as mp

    settings = rank_settings(config, int(config["port"] or free_port()))
    make_shared_dirs(config)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(
        _rank_main,
        args=(fn, args, kwargs, dict(config_dict or {}), settings, queue),
        nprocs=settings["nproc"],
        join=True,
    )
    return None if queue.empty() else queue.get()
