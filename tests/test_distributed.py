"""Multi-process training on RecBole's torch.distributed path: the configurable backend (compat),
the quantizer's state kept identical across ranks, and a 2-process CPU run against 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recbole.data import create_dataset, data_preparation
from tiny_mm import yaml_quantizer

from recbole_dppmg.config import build_config, user_settings
from recbole_dppmg.data.synthetic import SyntheticSpec, write_synthetic
from recbole_dppmg.distributed import average_sparse_grads_, free_port, resolve_backend
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.quick_start import run
from recbole_dppmg.utils import get_model, get_trainer

TINY = SyntheticSpec(interactions=4000, users=200, items=120, text_dim=16, image_dim=12, clusters=4)
SMALL_MODEL = {
    "embedding_size": 16,
    "codebook_size": 8,
    "levels": 2,
    "train_batch_size": 256,
    "eval_batch_size": 100000,
    "use_gpu": False,
    "torch_num_threads": 1,
}


def test_backend_follows_the_device_unless_set():
    assert resolve_backend("auto", cuda=False) == "gloo"
    assert resolve_backend(None, cuda=True) == "nccl"
    assert resolve_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve_backend("nccl", cuda=False)
    with pytest.raises(ConfigError, match="dist_backend must be one of"):
        resolve_backend("mpi", cuda=False)


def test_patched_recbole_starts_gloo_on_cpu_and_wraps_dppmg_in_ddp(tmp_path):
    """RecBole's own DDP path (a 1-rank group, in this process): gloo, not its hard-coded
    NCCL; DDP without device ids on CPU; the dataset-derived buffers (the sparse graph, the
    features) are not broadcast."""
    folder = write_synthetic(TINY, tmp_path, "tiny")
    settings = {
        **SMALL_MODEL,
        "data_path": str(tmp_path),
        "state": "ERROR",
        "checkpoint_dir": str(tmp_path / "saved"),
        "local_rank": 0,
        "nproc": 1,
        "world_size": 1,
        "ip": "127.0.0.1",
        "port": free_port(),
        "offset": 0,
    }
    try:
        config = build_config(get_model("DPPMG"), "tiny", [folder / "tiny.yaml"], settings)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert config["device"] == torch.device("cpu") and config["single_spec"] is False
        train_data, _, _ = data_preparation(config, create_dataset(config))
        model = get_model("DPPMG")(config, train_data._dataset)
        trainer = get_trainer(config, type(model))(config, model)
        assert isinstance(trainer.distributed_model, torch.nn.parallel.DistributedDataParallel)
        assert {"norm_adj", "feat_text", "present_image"} <= set(model._ddp_params_and_buffers_to_ignore)
        assert "quantizers.text.codebooks" not in model._ddp_params_and_buffers_to_ignore
        assert not {"local_rank", "nproc", "port", "dist_backend"} & set(user_settings(config))  # reloads in 1 process
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _quantizer_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        torch.manual_seed(100 + rank)  # ranks draw different k-means seeds and data
        quantizer = yaml_quantizer(levels=2, codebook_size=4, dim=3, dead_code_threshold=0.0)
        quantizer.kmeans_init(torch.randn(64, 3) + rank)
        after_init = quantizer.codebooks.clone()
        batch = torch.load(Path(out) / "batch.pt", weights_only=True)[rank]
        quantizer.train()(batch)
        torch.save({"init": after_init, "state": quantizer.state_dict()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_quantizer_state_is_identical_on_both_ranks_and_sees_both_batches(tmp_path):
    """k-means is taken from rank 0, and one EMA step over two ranks' batches equals one
    single-process step over both batches together."""
    halves = [torch.randn(10, 3), torch.randn(12, 3) + 0.5]
    torch.save(halves, tmp_path / "batch.pt")
    mp.spawn(_quantizer_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[0]["init"], ranks[1]["init"])
    for key, value in ranks[0]["state"].items():
        assert torch.allclose(value.float(), ranks[1]["state"][key].float(), atol=1e-6), key

    torch.manual_seed(100)  # replay rank 0's k-means here
    single = yaml_quantizer(levels=2, codebook_size=4, dim=3, dead_code_threshold=0.0)
    single.kmeans_init(torch.randn(64, 3))
    assert torch.allclose(single.codebooks, ranks[0]["init"], atol=1e-5)
    single.train()(torch.cat(halves))
    for key in ("codebooks", "ema_count", "ema_sum"):
        assert torch.allclose(getattr(single, key), ranks[0]["state"][key], atol=1e-5), key


def _run(tmp_path: Path, folder: Path, nproc: int, **extra):
    return run(
        "DPPMG",
        "tiny",
        [str(folder / "tiny.yaml")],
        {
            **SMALL_MODEL,
            "data_path": str(tmp_path),
            "checkpoint_dir": str(tmp_path / f"saved{nproc}"),
            "state": "ERROR",
            "epochs": 4,
            "nproc": nproc,
            "seed": 0,
            **extra,
        },
    )


def test_two_process_cpu_run_matches_one_process(tmp_path):
    """Same data, config and seed; the 2 ranks see other batches (DistributedSampler) and
    negatives, so the metrics agree within noise, not bit for bit. On this data (200 test
    users), 1-process NDCG@10 spans 0.196-0.228 over seeds 0-2, and 2 processes differed from
    1 by at most 0.016 at the same seed."""
    folder = write_synthetic(TINY, tmp_path, "tiny")
    one = _run(tmp_path, folder, 1)
    two = _run(tmp_path, folder, 2)
    assert two is not None and two.epochs_trained == one.epochs_trained == 4
    for metric in ("ndcg@10", "recall@20"):
        assert abs(two.test_result[metric] - one.test_result[metric]) < 0.04, (metric, one.test_result, two.test_result)
    runs = list((tmp_path / "saved2" / "tiny").iterdir())
    assert len(runs) == 1  # rank 0 chose the folder, both ranks used it
    saved = json.loads((runs[0] / "result.json").read_text())
    assert saved["test_result"] == two.test_result
    assert json.loads((runs[0] / "config.json").read_text())["world_size"] == 2


def test_two_process_sampled_run_matches_one_process(tmp_path):
    """Sampled mode (``propagation: sampled``) on 2 gloo ranks: each rank samples the neighbourhood
    of its half of the batch, the tables' sparse gradients are all-reduced by DDP (gloo), and the
    metrics agree with one process within the same noise as the full-graph test above."""
    folder = write_synthetic(TINY, tmp_path, "tiny")
    sampled = {"propagation": "sampled", "fanouts": [4, 4]}
    one = _run(tmp_path, folder, 1, **sampled)
    two = _run(tmp_path, folder, 2, **sampled)
    assert two is not None and two.epochs_trained == one.epochs_trained == 4
    for metric in ("ndcg@10", "recall@20"):
        assert abs(two.test_result[metric] - one.test_result[metric]) < 0.04, (metric, one.test_result, two.test_result)
    runs = list((tmp_path / "saved2" / "tiny").iterdir())
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["world_size"] == 2 and config["propagation"] == "sampled"


def _sampled_rank(rank: int, port: int, root: str) -> None:
    folder = Path(root) / "tiny"
    settings = {
        **SMALL_MODEL,
        "data_path": root,
        "state": "ERROR",
        "checkpoint_dir": str(Path(root) / "saved"),
        "local_rank": rank,
        "nproc": 2,
        "world_size": 2,
        "ip": "127.0.0.1",
        "port": port,
        "offset": 0,
        "seed": 0,
        "propagation": "sampled",
        "fanouts": [3, 3],
        "kmeans_warmup_epochs": 0,
    }
    try:
        config = build_config(get_model("DPPMG"), "tiny", [folder / "tiny.yaml"], settings)
        train_data, _, _ = data_preparation(config, create_dataset(config))
        model = get_model("DPPMG")(config, train_data._dataset)
        trainer = get_trainer(config, type(model))(config, model)
        torch.manual_seed(10 + rank)  # the ranks draw different neighbourhoods
        trainer._train_epoch(train_data, 0)
        torch.save(model.state_dict(), Path(root) / f"sampled{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sampled_ranks_stay_identical_after_sparse_all_reduce(tmp_path):
    """Each rank samples its own neighbourhoods; DDP all-reduces the dense gradients,
    ``average_sparse_grads_`` the table gradients, and the quantizer syncs its state, so every
    parameter and buffer agrees after an epoch (the tables also start from rank 0's values)."""
    write_synthetic(TINY, tmp_path, "tiny")
    mp.spawn(_sampled_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"sampled{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.allclose(value.float(), states[1][key].float(), atol=1e-5), key


def _sparse_rank(rank: int, port: int, root: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        wide, narrow, untouched = (
            torch.nn.Embedding(10, 3, sparse=True),
            torch.nn.Embedding(6, 2, sparse=True),
            torch.nn.Embedding(4, 2, sparse=True),
        )
        for table in (wide, narrow, untouched):
            torch.nn.init.constant_(table.weight, 1.0)
        rows = [torch.tensor([0, 3, 3, 7]), torch.tensor([3, 9])][rank]  # a duplicate row, an overlap
        loss = (wide(rows) * torch.arange(1.0, 4.0)).sum() * (rank + 1)
        if rank == 1:  # rank 0 leaves this table without a gradient
            loss = loss + narrow(torch.tensor([5])).sum()
        loss.backward()
        params = [wide.weight, narrow.weight, untouched.weight]
        average_sparse_grads_(params)
        grads = {name: p.grad.to_dense() for name, p in zip(("wide", "narrow"), params)}
        assert untouched.weight.grad is None
        torch.save(grads, Path(root) / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sparse_table_gradients_are_averaged_over_ranks_with_dense_collectives(tmp_path):
    """DDP leaves sparse tables to ``average_sparse_grads_`` (gloo's sparse all-reduce crashed, NCCL
    has none): every rank ends with the mean of the ranks' row gradients, duplicates summed, a table
    only one rank touched included, one no rank touched left without a gradient."""
    mp.spawn(_sparse_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    grads = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in (0, 1)]
    weights = torch.arange(1.0, 4.0)
    wide = torch.zeros(10, 3)
    wide[0] += weights
    wide[3] += 2 * weights + 2 * weights  # rank 0 twice; rank 1 once with factor 2
    wide[7] += weights
    wide[9] += 2 * weights
    narrow = torch.zeros(6, 2)
    narrow[5] = 1.0
    for got in grads:
        torch.testing.assert_close(got["wide"], wide / 2)
        torch.testing.assert_close(got["narrow"], narrow / 2)
