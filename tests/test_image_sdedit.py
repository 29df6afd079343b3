"""SDEdit starts of the poster generator (image.sdedit_strength, image.sdedit_blend) with tiny
models from config: the starting poster is the one the tokens retrieve (or the history's best), or
the mean of the first few, shuffled tokens start from the partner's, strength 1 is plain sampling,
image RL samples the same way, and the errors a user can cause name the key."""

import pytest
import torch
from image_fixtures import tiny_settings, write_tiny_export

from recbole_dppmg.errors import ConfigError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.autoencoder import PixelCodec
from recbole_dppmg.generation.image.data import training_pairs
from recbole_dppmg.generation.image.generate import generate_posters, initial_noise, user_context, user_positions
from recbole_dppmg.generation.image.model import PosterDiffusion, sdedit_skip
from recbole_dppmg.generation.image.train import build_context
from recbole_dppmg.generation.rl.image import ddim_scheduler, sample_trajectories
from recbole_dppmg.tokens import PreferenceTokens

N_ITEMS, K = 12, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(tmp_path, conditioning):
    """An untrained tiny model over random catalogue 'latents' (3 x 16 x 8) of ``conditioning``."""
    export = write_tiny_export(tmp_path / "tokens", n_users=8, n_items=N_ITEMS, codebook_size=6)
    tokens = PreferenceTokens.load(export)
    vocab = PreferenceVocabulary(tokens)
    items = [f"i{k}" for k in range(N_ITEMS)]
    pairs = training_pairs(tokens, items, 4.0, valid_users=1, test_users=1, seed=0)
    settings = tiny_settings(tmp_path, conditioning=conditioning, retrieval_k=K)
    latents = torch.randn(N_ITEMS, 3, 16, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    context = build_context(settings, latents, items, tokens, pairs.train_users)
    model = PosterDiffusion(settings, vocab.vectors, 2 * vocab.levels, 3, vocab.slot_modalities(), context).eval()
    model.set_latent_stats(latents)
    return tokens, vocab, model, latents


def test_skipped_steps_follow_the_strength_and_always_leave_one():
    assert sdedit_skip(20, 1.0) == 0
    assert sdedit_skip(20, 0.6) == 8
    assert sdedit_skip(20, 0.01) == 19
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"image.sdedit_strength must be in \(0, 1\]"):
            sdedit_skip(20, bad)


def test_the_start_is_the_poster_the_tokens_retrieve_and_shuffled_tokens_start_from_the_partners(tmp_path):
    tokens, vocab, model, latents = _model(tmp_path, "retrieval")
    users = list(tokens.users)
    own = user_positions(vocab, users)
    start = model.init_latents(own)
    best = model.retrieve(own)[:, 0]
    assert torch.allclose(start, model.normalise(latents[best].half().float()))
    assert len({tuple(r.flatten().tolist()) for r in start}) > 1  # different users, different starts
    shuffled = user_positions(vocab, users, "shuffled", seed=3)
    partner = [next(b for b in range(len(users)) if torch.equal(own[b], shuffled[a])) for a in range(len(users))]
    assert torch.equal(model.init_latents(shuffled), start[partner])
    # no tokens (the population condition): the catalogue's mean latent, zeros once normalised
    assert torch.equal(model.init_latents(user_positions(vocab, users[:2], "none")), torch.zeros(2, 3, 16, 8))


def test_a_blended_start_is_the_mean_of_the_first_retrieved_posters(tmp_path):
    tokens, vocab, model, latents = _model(tmp_path, "retrieval")
    users = list(tokens.users)
    own = user_positions(vocab, users)
    ranked = model.retrieve(own)
    assert torch.equal(model.init_latents(own, blend=1), model.init_latents(own))
    for blend in (2, K):
        expected = model.normalise(latents[ranked[:, :blend]].half().float()).mean(dim=1)
        assert torch.allclose(model.init_latents(own, blend=blend), expected, atol=1e-6)
    assert not torch.allclose(model.init_latents(own, blend=2), model.init_latents(own))
    assert torch.equal(model.init_latents(user_positions(vocab, users[:2], "none"), blend=K), torch.zeros(2, 3, 16, 8))
    posters = generate_posters(model, PixelCodec(), own[:2], steps=4, strength=0.5, blend=2, progress=False)
    assert not torch.equal(
        posters, generate_posters(model, PixelCodec(), own[:2], steps=4, strength=0.5, progress=False)
    )
    for bad in (0, K + 1):
        with pytest.raises(
            ConfigError, match=rf"image.sdedit_blend must be in \[1, image.retrieval_k={K}\], got {bad}"
        ):
            model.init_latents(own, blend=bad)
    with pytest.raises(ConfigError, match="image.sdedit_blend must be >= 1"):
        load_settings("image", {"sdedit_blend": 0})
    with pytest.raises(ConfigError, match="rl.image.sdedit_blend must be >= 1"):
        load_settings("rl", {"image": {"sdedit_blend": 0}})


def test_a_blended_history_start_averages_only_the_posters_a_user_has(tmp_path):
    tokens, vocab, model, latents = _model(tmp_path, "history")
    users = list(tokens.users)[:2]
    rows = user_context(model, tokens, users)
    rows[0, 1:] = -1  # a user with one training poster
    start = model.init_latents(user_positions(vocab, users), rows, blend=K)
    assert torch.allclose(start[0], model.normalise(latents[rows[0, 0]].half().float()), atol=1e-6)
    present = rows[1][rows[1] >= 0]
    assert torch.allclose(start[1], model.normalise(latents[present].half().float()).mean(dim=0), atol=1e-6)


def test_a_weak_edit_stays_near_its_start_and_strength_one_is_plain_sampling(tmp_path):
    tokens, vocab, model, _ = _model(tmp_path, "retrieval")
    users = list(tokens.users)[:4]
    positions = user_positions(vocab, users)
    noise = initial_noise(model, len(users), seed=1)
    start = model.init_latents(positions)
    plain = model.sample(positions, noise, steps=10)
    assert torch.equal(model.sample(positions, noise, steps=10, init=start, strength=1.0), plain)
    edited = model.sample(positions, noise, steps=10, init=start, strength=0.1)  # one step from t near 0
    own = (edited - start).abs().mean(dim=(1, 2, 3))
    other = (edited - start.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert (own < 0.5 * other).all(), (own, other)
    assert not torch.allclose(edited, plain)
    with pytest.raises(ConfigError, match="needs an initial poster latent"):
        model.sample(positions, noise, steps=10, strength=0.5)


def test_history_generators_start_from_the_users_best_training_poster(tmp_path):
    tokens, vocab, model, latents = _model(tmp_path, "history")
    users = list(tokens.users)[:4]
    rows = user_context(model, tokens, users)
    start = model.init_latents(user_positions(vocab, users), rows)
    assert torch.allclose(start, model.normalise(latents[rows[:, 0]].half().float()))
    none = user_context(model, tokens, users, "none")
    assert torch.equal(model.init_latents(user_positions(vocab, users), none), torch.zeros_like(start))
    with pytest.raises(ConfigError, match="history image generator needs each user's history posters"):
        model.init_latents(user_positions(vocab, users))
    posters = generate_posters(
        model, PixelCodec(), user_positions(vocab, users), steps=4, context=rows, strength=0.5, progress=False
    )
    assert posters.shape == (4, 3, 16, 8) and torch.isfinite(posters).all()


def test_a_generator_without_a_start_poster_samples_from_noise_and_bad_strengths_name_the_key(tmp_path):
    tokens, vocab, model, _ = _model(tmp_path, "tokens")
    positions = user_positions(vocab, list(tokens.users)[:2])
    plain = generate_posters(model, PixelCodec(), positions, steps=2, progress=False)
    assert torch.equal(generate_posters(model, PixelCodec(), positions, steps=2, strength=0.5, progress=False), plain)
    with pytest.raises(ConfigError, match="sdedit_strength < 1 starts from a context poster.*retrieval"):
        model.init_latents(positions)
    with pytest.raises(ConfigError, match="image.sdedit_strength must be <= 1"):
        load_settings("image", {"sdedit_strength": 1.5})
    with pytest.raises(ConfigError, match="rl.image.sdedit_strength must be > 0"):
        load_settings("rl", {"image": {"sdedit_strength": 0}})


def test_image_rl_chains_start_from_the_same_posters(tmp_path):
    tokens, vocab, model, _ = _model(tmp_path, "retrieval")
    positions = user_positions(vocab, list(tokens.users)[:3])
    scheduler = ddim_scheduler(model, 10)
    full = sample_trajectories(model, scheduler, positions, 1.0, 2.0, torch.Generator().manual_seed(0))
    edit = sample_trajectories(model, scheduler, positions, 1.0, 2.0, torch.Generator().manual_seed(0), strength=0.3)
    assert full.timesteps == [int(t) for t in scheduler.timesteps][: len(full.timesteps)]
    assert edit.timesteps == full.timesteps[sdedit_skip(10, 0.3) :]
    noise = torch.randn(edit.starts[:, 0].shape, generator=torch.Generator().manual_seed(0))
    expected = scheduler.add_noise(model.init_latents(positions), noise, torch.tensor([edit.timesteps[0]] * 3))
    assert torch.allclose(edit.starts[:, 0], expected)
    short = ddim_scheduler(model, 2)  # 2 steps at strength 0.3 would leave only the deterministic last one
    kept = sample_trajectories(model, short, positions, 1.0, 2.0, torch.Generator().manual_seed(0), strength=0.3)
    assert kept.timesteps == [int(short.timesteps[0])]
    blended = sample_trajectories(
        model, scheduler, positions, 1.0, 2.0, torch.Generator().manual_seed(0), strength=0.3, blend=2
    )
    expected = scheduler.add_noise(model.init_latents(positions, blend=2), noise, torch.tensor([edit.timesteps[0]] * 3))
    assert torch.allclose(blended.starts[:, 0], expected)
