"""ResidualVectorQuantizer: k-means init, straight-through gradients, EMA, dead-code restart."""

import io

import pytest
import torch
from tiny_mm import yaml_quantizer

from recbole_dppmg.model.quantizer import faiss_kmeans


def clustered(n_per=25, centres=4, dim=6, spread=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = 3 * torch.randn(centres, dim, generator=gen)
    x = c.repeat_interleave(n_per, 0) + spread * torch.randn(centres * n_per, dim, generator=gen)
    return x, c


def test_kmeans_init_lands_on_data_points():
    # As many distinct points as codes: every code is exactly one of the points.
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    rvq = yaml_quantizer(levels=1, codebook_size=8, dim=5)
    rvq.kmeans_init(x, seed=0)
    dist = torch.cdist(rvq.codebooks[0], x)
    assert torch.allclose(dist.min(1).values, torch.zeros(8), atol=1e-5)
    assert dist.argmin(1).unique().numel() == 8  # each point has its own code
    # Tight clusters: each code sits on a cluster, next to its points.
    x, centres = clustered()
    rvq = yaml_quantizer(levels=1, codebook_size=4, dim=6)
    rvq.kmeans_init(x, seed=0)
    assert torch.cdist(rvq.codebooks[0], x).min(1).values.max() < 0.05
    assert torch.cdist(rvq.codebooks[0], centres).argmin(1).unique().numel() == 4
    assert rvq.is_initialized


def test_kmeans_with_fewer_points_than_codes():
    x = torch.randn(3, 4)
    centroids = faiss_kmeans(x, 6, seed=0)
    assert centroids.shape == (6, 4)
    assert torch.cdist(centroids, x).min(1).values.max() < 0.05


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 4)
    inputs = torch.randn(32, 3)
    rvq = yaml_quantizer(levels=2, codebook_size=4, dim=4)
    rvq.kmeans_init(encoder(inputs))
    rvq.eval()
    out = rvq(encoder(inputs))
    weights = torch.randn(4)
    (out.quantized @ weights).sum().backward()
    st_grad = encoder.weight.grad.clone()
    assert st_grad.abs().sum() > 0
    # Straight-through: the encoder gets exactly the gradient it would get unquantized.
    encoder.zero_grad()
    (encoder(inputs) @ weights).sum().backward()
    assert torch.allclose(st_grad, encoder.weight.grad)
    # The forward value is the reconstruction, and the commitment loss trains the encoder too.
    assert torch.allclose(out.quantized, rvq.decode(out.codes), atol=1e-5)
    encoder.zero_grad()
    rvq(encoder(inputs)).commitment_loss.backward()
    assert encoder.weight.grad.abs().sum() > 0


def test_commitment_is_on_the_final_reconstruction_only():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    rvq = yaml_quantizer(levels=3, codebook_size=8, dim=6, commitment_beta=0.5)
    rvq.kmeans_init(x, seed=0)
    rvq.eval()  # no EMA update, so the codebooks are those that produced the codes
    out = rvq(x)
    expected = 0.5 * (x - rvq.decode(out.codes)).pow(2).sum(1).mean()
    assert torch.allclose(out.commitment_loss, expected, atol=1e-6)
    # A per-level sum would be at least the level-0 error, far above the final one.
    level0 = (x - rvq.decode(out.codes[:, :1])).pow(2).sum(1).mean()
    assert out.commitment_loss < 0.5 * level0


def test_reconstruction_error_falls_as_levels_are_added():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    rvq = yaml_quantizer(levels=4, codebook_size=16, dim=8)
    rvq.kmeans_init(x, seed=0)
    err = rvq.code_stats(x)["quant_error"]
    assert all(b < a for a, b in zip(err, err[1:])), err
    assert err[0] < 1.0
    # Decoding a prefix of the codes gives the partial reconstruction.
    codes = rvq.encode(x)
    for level in range(1, 5):
        partial = rvq.decode(codes[:, :level])
        rel = (x - partial).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert rel.item() == pytest.approx(err[level - 1], rel=1e-4)


def test_dead_codes_get_restarted_on_batch_vectors():
    torch.manual_seed(0)
    x, _ = clustered(centres=4)  # 25 points per cluster -> EMA count 25 per code
    rvq = yaml_quantizer(levels=1, codebook_size=4, dim=6, ema_decay=0.5, dead_code_threshold=13)
    rvq.kmeans_init(x, seed=0)
    old_codes = rvq.encode(x)[:, 0]
    # A batch from two clusters only: the other two codes decay to 12.5 < 13 and restart.
    batch = x[(old_codes == old_codes[0]) | (old_codes == old_codes[-1])]
    used = {int(old_codes[0]), int(old_codes[-1])}
    dead = [c for c in range(4) if c not in used]
    rvq.train()
    rvq(batch)
    assert int(rvq.restarts[0]) == 2
    # Restarted codes now sit on vectors of the batch; the live ones stayed on their clusters.
    assert torch.cdist(rvq.codebooks[0, dead], batch).min(1).values.max() < 1e-5
    assert rvq.ema_count[0, dead].min() >= 13
    # ... and the batch now uses all four codes.
    assert rvq.code_stats(batch)["codes_used"][0] == 4


def test_ema_moves_codes_toward_assigned_vectors():
    x, _ = clustered(centres=2)
    rvq = yaml_quantizer(levels=1, codebook_size=2, dim=6, ema_decay=0.8, dead_code_threshold=0.0)
    rvq.kmeans_init(x, seed=0)
    shifted = x + 0.5
    rvq.train()
    err0 = rvq.code_stats(shifted)["quant_error"][0]
    for _ in range(20):
        rvq(shifted)
    assert rvq.code_stats(shifted)["quant_error"][0] < 0.1 * err0
    rvq.eval()
    before = rvq.codebooks.clone()
    rvq(x)  # no updates in eval mode
    assert torch.equal(before, rvq.codebooks)


def test_state_dict_round_trip_weights_only():
    x = torch.randn(50, 4)
    rvq = yaml_quantizer(levels=2, codebook_size=4, dim=4)
    rvq.kmeans_init(x, seed=0)
    rvq.train()
    rvq(x)
    buf = io.BytesIO()
    torch.save(rvq.state_dict(), buf)
    buf.seek(0)
    fresh = yaml_quantizer(levels=2, codebook_size=4, dim=4)
    assert not fresh.is_initialized
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.is_initialized
    assert torch.equal(fresh.encode(x), rvq.encode(x))
    assert torch.equal(fresh.ema_count, rvq.ema_count)


def test_use_before_init_is_an_error():
    with pytest.raises(RuntimeError, match="kmeans_init"):
        yaml_quantizer(levels=1, codebook_size=2, dim=2)(torch.randn(3, 2))
