"""RL of the generators (GRPO for text, DDPO for posters) with tiny models built from config:
the loss pieces on hand-made numbers, the sampler's log-probs against the sampling itself and
against diffusers, that only token-associated tensors move, that a user-specific reward goes
up, exact resume, and the run folders the other stages load."""

import json

import numpy as np
import pytest
import torch
from image_fixtures import (
    TINY_MODEL,
    tiny_settings,
    write_tiny_export,
    write_tiny_posters,
)
from text_tiny import FakeTokens, tiny_lm, tiny_tokenizer

from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import load_settings, rl_phase_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.autoencoder import PixelCodec
from recbole_dppmg.generation.image.model import PosterDiffusion
from recbole_dppmg.generation.rl import image as rl_image
from recbole_dppmg.generation.rl import text as rl_text
from recbole_dppmg.generation.rl.common import (
    JudgeReward,
    cached_features,
    group_advantages,
    reward_advantages,
    step_record,
)
from recbole_dppmg.generation.text.generate import TokenConditioner
from recbole_dppmg.generation.text.injection import inject_preference_tokens
from recbole_dppmg.tokens import PreferenceTokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- tiny models
def sharp_lm(tokenizer, seed: int = 0):
    """A tiny Llama whose output depends on its prompt, so a policy gradient has something to move."""
    return tiny_lm(tokenizer, seed=seed, init_range=0.3)


def make_text(lora_r: int = 0):
    tokens = FakeTokens()
    tokenizer = tiny_tokenizer()
    vocabulary = PreferenceVocabulary(tokens)
    lm = inject_preference_tokens(sharp_lm(tokenizer), tokenizer, vocabulary, backbone="tiny", lora_r=lora_r, seed=0)
    return tokens, vocabulary, lm


def letters_reward(tokens):
    """User-specific: users of even genre clusters are rewarded for letters a-m, odd ones for n-z."""

    def reward(users, texts):
        out = []
        for user, text in zip(users, texts):
            letters = "abcdefghijklm" if tokens.cluster[user] % 2 == 0 else "nopqrstuvwxyz"
            out.append(sum(ch in letters for ch in text.lower()) / max(1, len(text)))
        return {"letters": np.array(out), "total": np.array(out)}

    return reward


def text_cfg(**overrides):
    return rl_phase_settings(
        "text",
        {
            "users_per_step": 4,
            "group_size": 4,
            "max_new_tokens": 8,
            "learning_rate": 0.1,
            "kl_weight": 0.02,
            "save_steps": 1,
            "progress": False,
            "max_minutes": None,
            **overrides,
        },
    )


def make_image(tmp_path):
    tokens = PreferenceTokens.load(write_tiny_export(tmp_path / "tokens", n_users=8))
    vocab = PreferenceVocabulary(tokens)
    torch.manual_seed(0)
    model = PosterDiffusion(TINY_MODEL, vocab.vectors, 4, 3).eval()
    return tokens, vocab, model


def colour_reward(tokens):
    """User-specific: each user wants the colour channel ``first text code % 3`` to dominate."""

    def reward(users, posters):
        out = [float(p[int(tokens.codes_for(u)[0, 0]) % 3].mean() - p.mean()) for u, p in zip(users, posters)]
        return np.array(out)

    return reward


def image_cfg(**overrides):
    return rl_phase_settings(
        "image",
        {
            "users_per_step": 2,
            "group_size": 8,
            "sample_steps": 4,
            "learning_rate": 0.1,
            "save_steps": 1,
            "progress": False,
            "max_minutes": None,
            **overrides,
        },
    )


# ---------------------------------------------------------------------------- loss pieces
def test_group_advantages_on_a_hand_made_group():
    rewards = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0]
    adv = group_advantages(rewards, 3)
    np.testing.assert_allclose(adv[:3], np.array([-1.0, 0.0, 1.0]) / (1.0 + 1e-4))  # group std (ddof 1) = 1
    assert np.all(adv[3:] == 0)  # equal rewards carry no signal
    np.testing.assert_allclose(group_advantages(rewards, 3, "none"), [-1, 0, 1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(
        group_advantages(rewards, 3, "batch")[:3], np.array([-1, 0, 1]) / (np.std(rewards, ddof=1) + 1e-4)
    )
    # a constant per group (the fixed partner modality's personalization) cancels exactly
    np.testing.assert_allclose(group_advantages(np.array(rewards) + [0.3, 0.3, 0.3, 0.9, 0.9, 0.9], 3), adv, atol=1e-9)
    with pytest.raises(DataError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_component_advantages_give_a_narrow_component_its_weight():
    # two groups of 4: the judge spreads widely, consistency only by hundredths; the partner's
    # personalization is fixed per user
    judge = np.array([0.2, 0.8, 0.5, 0.6, 0.3, 0.9, 0.4, 0.7])
    consistency = np.array([0.37, 0.36, 0.41, 0.35, 0.40, 0.36, 0.38, 0.37])
    partner = np.repeat([0.55, 0.65], 4)
    table = {
        "text_personalization": judge,
        "consistency": consistency,
        "image_personalization": partner,
        "total": (judge + consistency + partner) / 3,
    }
    by_total = reward_advantages(table, 4, "group")
    np.testing.assert_allclose(by_total, group_advantages(table["total"], 4))
    mixed = reward_advantages(table, 4, "component")
    expected = group_advantages(judge, 4) + group_advantages(consistency, 4)  # the constant partner adds 0
    np.testing.assert_allclose(mixed, expected / (expected.std(ddof=1) + 1e-4))
    assert abs(np.std(mixed, ddof=1) - 1) < 1e-3
    # sample 3 (best consistency, middling judge) loses against sample 4 by the total, wins by components
    assert by_total[2] < by_total[3] and mixed[2] > mixed[3]
    # a component's scale and offset do not matter any more; its weight does
    rescaled = {**table, "consistency": 10 * consistency - 3}
    np.testing.assert_allclose(reward_advantages(rescaled, 4, "component"), mixed, atol=0.02)  # up to eps
    judge_only = reward_advantages(table, 4, "component", {"consistency": 0.0})
    z = group_advantages(judge, 4)
    np.testing.assert_allclose(judge_only, z / (z.std(ddof=1) + 1e-4))
    # a bare total (a reward_fn without components) falls back to it
    np.testing.assert_allclose(reward_advantages({"total": judge}, 4, "component"), z / (z.std(ddof=1) + 1e-4))
    record = step_record(1, table, mixed, group_size=4)
    assert record["group_std_image_personalization"] == 0.0
    assert record["group_std_text_personalization"] > 10 * record["group_std_consistency"]
    with pytest.raises(ConfigError, match="component"):
        rl_phase_settings("text", {"advantage_scale": "components"})


def test_grpo_loss_on_hand_made_numbers():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = rl_text.grpo_loss(logps, logps.detach(), adv, mask, clip_range=0.2)
    # ratio 1: loss = -(sum of advantages over generated tokens) / tokens = -(3*1 - 2*2) / 5
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    np.testing.assert_allclose(logps.grad.numpy(), [[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]], atol=1e-7)
    assert stats["clip_fraction"] == 0
    # a ratio beyond 1 + eps with a positive advantage is clipped: no gradient through it
    new = torch.tensor([[0.0]], requires_grad=True)
    loss, stats = rl_text.grpo_loss(
        new, torch.tensor([[-1.0]]), torch.tensor([1.0]), torch.tensor([[1]]), clip_range=0.2
    )
    assert loss.item() == pytest.approx(-1.2) and stats["clip_fraction"] == 1.0
    loss.backward()
    assert new.grad.item() == 0.0
    # k3 KL: exp(d) - d - 1 with d = ref - logp, weighted
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.5]])
    loss, stats = rl_text.grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), 0.2, ref, kl_weight=0.5)
    kl = (np.exp(-0.5) + 0.5 - 1) / 2
    assert stats["kl"] == pytest.approx(kl, rel=1e-5) and loss.item() == pytest.approx(0.5 * kl, rel=1e-5)


def test_completion_mask_stops_after_the_first_end_token():
    completion = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    assert rl_text.completion_mask(completion, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_text_logprobs_are_those_of_the_sampling_policy():
    tokens, vocabulary, lm = make_text()
    conditioner = TokenConditioner(lm, vocabulary)
    rollout = rl_text.sample_rollout(lm, conditioner, ["u0", "u1"], 3, 8, 0.7, seed=5)
    assert len(rollout.texts) == 6 and rollout.users == ["u0"] * 3 + ["u1"] * 3
    with torch.no_grad():
        ours = rl_text.completion_logprobs(lm, conditioner, rollout, 0.7)
    torch.manual_seed(5)
    with conditioner.inference():
        out = lm.model.generate(
            inputs_embeds=conditioner.inputs_embeds(rollout.prompt_ids, rollout.users),
            attention_mask=rollout.prompt_mask,
            do_sample=True,
            temperature=0.7,
            top_p=1.0,
            top_k=0,
            max_new_tokens=8,
            suppress_tokens=lm.token_ids,
            pad_token_id=lm.tokenizer.pad_token_id,
            eos_token_id=lm.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
    scores = torch.stack(out.scores, dim=1).float()  # what generate sampled from: tempered, preference tokens at -inf
    sampled = torch.log_softmax(scores, -1).gather(-1, out.sequences[:, -scores.shape[1] :].unsqueeze(-1)).squeeze(-1)
    keep = rollout.completion_mask.bool()
    assert torch.equal(out.sequences[:, -scores.shape[1] :][keep], rollout.completion[keep])
    assert torch.allclose(ours[keep], sampled[keep], atol=1e-5)


def test_ddim_transition_matches_diffusers_and_the_gaussian_log_prob(tmp_path):
    _, _, model = make_image(tmp_path)
    scheduler = rl_image.ddim_scheduler(model, 5)
    torch.manual_seed(0)
    x, out, noise = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    for t in scheduler.timesteps:
        mean, std = rl_image.ddim_transition(scheduler, out, int(t), x, eta=0.7)
        step = scheduler.step(out, t, x, eta=0.7, variance_noise=noise).prev_sample
        assert torch.allclose(mean + std * noise, step, atol=1e-5)
    # by hand at t = 20 (prev 10), epsilon prediction, eta = 1
    a_t, a_prev = scheduler.alphas_cumprod[20].item(), scheduler.alphas_cumprod[10].item()
    sigma = np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
    hand_mean = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * out
    mean, std = rl_image.ddim_transition(scheduler, out, 20, x, eta=1.0)
    assert std == pytest.approx(sigma) and torch.allclose(mean, hand_mean, atol=1e-5)
    sample = mean + std * noise
    hand_logp = (-(noise**2) / 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).mean(dim=(1, 2, 3))
    assert torch.allclose(rl_image.gaussian_logprob(sample, mean, std), hand_logp, atol=1e-5)
    # the last step of this schedule ends at alpha = 1: deterministic, never trained on
    assert rl_image.ddim_transition(scheduler, out, 0, x, eta=1.0)[1] == 0.0


# ---------------------------------------------------------------------------- only token parameters move
@pytest.mark.parametrize("lora_r", [0, 4])
def test_one_text_rl_step_moves_only_token_parameters(tmp_path, lora_r):
    tokens, vocabulary, lm = make_text(lora_r)
    frozen = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "trainable_tokens_delta" not in n}
    deltas = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "trainable_tokens_delta" in n}
    projection = lm.projection.linear.weight.detach().clone()
    state = rl_text.run_text_rl(
        lm, vocabulary, letters_reward(tokens), tokens.users, text_cfg(steps=1), tmp_path / "run"
    )
    assert state["step"] == 1 and state["finished"]
    for name, p in lm.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # base weights (and warm-up LoRA) bit-identical
    assert all(not torch.equal(p, deltas[n]) for n, p in lm.model.named_parameters() if n in deltas)
    assert not torch.equal(lm.projection.linear.weight, projection)
    record = state["history"][0]
    assert {"reward_total", "reward_letters", "kl", "advantage_std", "seconds", "loss"} <= set(record)
    assert json.loads((tmp_path / "run" / "rl_history.json").read_text()) == state["history"]


def test_text_rl_without_deltas_moves_only_the_codebook_projection(tmp_path):
    """rl.text.train_deltas False: the preference and prefix rows keep their warm-up values."""
    tokens, vocabulary, lm = make_text()
    deltas = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "trainable_tokens_delta" in n}
    projection = lm.projection.linear.weight.detach().clone()
    cfg = text_cfg(steps=1, train_deltas=False)
    state = rl_text.run_text_rl(lm, vocabulary, letters_reward(tokens), tokens.users, cfg, tmp_path / "run")
    assert state["finished"] and deltas
    assert all(torch.equal(p, deltas[n]) for n, p in lm.model.named_parameters() if n in deltas)
    assert not torch.equal(lm.projection.linear.weight, projection)
    with pytest.raises(CheckpointError, match="other trainable tensors"):  # its checkpoint holds the projection only
        rl_text.run_text_rl(lm, vocabulary, letters_reward(tokens), tokens.users, text_cfg(steps=2), tmp_path / "run")


def test_one_image_rl_step_moves_only_the_token_conditioning(tmp_path):
    tokens, vocab, model = make_image(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = rl_image.run_image_rl(
        model, PixelCodec(), vocab, colour_reward(tokens), tokens.users, image_cfg(steps=1), tmp_path / "run"
    )
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {
        "slot",
        "projection.linear.weight",
        "projection.linear.bias",
    }  # UNet, null, latent stats untouched
    assert state["history"][0]["reward_total"] == pytest.approx(state["history"][0]["reward_total"])
    model_null = image_cfg(steps=1, train_null=True)
    _, _, fresh = make_image(tmp_path)
    rl_image.run_image_rl(
        fresh, PixelCodec(), vocab, colour_reward(tokens), tokens.users, model_null, tmp_path / "run_null"
    )
    assert not torch.equal(fresh.null, before["null"])


# ---------------------------------------------------------------------------- the reward goes up
def test_text_rl_raises_a_user_specific_reward(tmp_path):
    tokens, vocabulary, lm = make_text()
    conditioner = TokenConditioner(lm, vocabulary)
    reward = letters_reward(tokens)

    def mean_reward():
        rollout = rl_text.sample_rollout(lm, conditioner, tokens.users, 32, 8, 0.7, seed=123)  # 512 texts, fixed seed
        return float(np.mean(reward(rollout.users, rollout.texts)["total"]))

    before = mean_reward()
    rl_text.run_text_rl(lm, vocabulary, reward, tokens.users, text_cfg(steps=20, save_steps=100), tmp_path / "run")
    assert mean_reward() > before + 0.01  # measured 0.200 -> 0.220 (per-text std 0.14, 512 texts)


def test_image_rl_raises_a_user_specific_reward(tmp_path):
    tokens, vocab, model = make_image(tmp_path)
    reward, codec, users = colour_reward(tokens), PixelCodec(), ["u0", "u1"]  # u0 wants green, u1 red

    def mean_reward():
        positions = torch.tensor([vocab.ids_for(u) for u in users for _ in range(64)])
        traj = rl_image.sample_trajectories(
            model, rl_image.ddim_scheduler(model, 4), positions, 1.0, 2.0, torch.Generator().manual_seed(99)
        )
        return float(
            np.mean(reward([u for u in users for _ in range(64)], codec.decode(model.denormalise(traj.final))))
        )

    before = mean_reward()
    rl_image.run_image_rl(model, codec, vocab, reward, users, image_cfg(steps=8, save_steps=100), tmp_path / "run")
    assert mean_reward() > before + 0.01  # measured -0.077 -> -0.048


# ---------------------------------------------------------------------------- resume
def test_text_rl_resume_gives_the_same_state(tmp_path):
    tokens, vocabulary, lm = make_text()
    rl_text.run_text_rl(lm, vocabulary, letters_reward(tokens), tokens.users, text_cfg(steps=2), tmp_path / "straight")
    straight = {k: v.clone() for k, v in lm.trainable_state().items()}
    _, _, lm = make_text()
    rl_text.run_text_rl(lm, vocabulary, letters_reward(tokens), tokens.users, text_cfg(steps=1), tmp_path / "split")
    _, _, lm = make_text()  # a fresh process: rebuilt model, state from the checkpoint
    state = rl_text.run_text_rl(
        lm, vocabulary, letters_reward(tokens), tokens.users, text_cfg(steps=2), tmp_path / "split"
    )
    assert state["step"] == 2 and len(state["history"]) == 2
    resumed = lm.trainable_state()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_image_rl_resume_gives_the_same_state(tmp_path):
    tokens, vocab, model = make_image(tmp_path)
    rl_image.run_image_rl(
        model, PixelCodec(), vocab, colour_reward(tokens), tokens.users, image_cfg(steps=2), tmp_path / "straight"
    )
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, model = make_image(tmp_path)
    rl_image.run_image_rl(
        model, PixelCodec(), vocab, colour_reward(tokens), tokens.users, image_cfg(steps=1), tmp_path / "split"
    )
    _, _, model = make_image(tmp_path)
    rl_image.run_image_rl(
        model, PixelCodec(), vocab, colour_reward(tokens), tokens.users, image_cfg(steps=2), tmp_path / "split"
    )
    assert all(torch.equal(straight[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- run folders
@pytest.fixture
def warm_text_run(tmp_path, monkeypatch):
    """A finished tiny text warm-up run."""
    from text_tiny import tiny_text_stage

    from recbole_dppmg.generation.text import pipeline as text_pipeline

    tokens, config = tiny_text_stage(tmp_path, monkeypatch)
    config = {**config, "max_steps": 1, "eval_steps": 1}
    return tokens, text_pipeline.train_text_generator("tiny-text", None, config), config


def test_train_text_rl_writes_a_loadable_generator(warm_text_run, tmp_path):
    from recbole_dppmg.generation.text.loading import load_text_generator

    tokens, warm, config = warm_text_run
    settings = {
        "steps": 2,
        "users_per_step": 2,
        "group_size": 2,
        "max_new_tokens": 4,
        "save_steps": 1,
        "progress": False,
    }
    run = rl_text.train_text_rl(
        "tiny-text", warm, None, settings, reward_fn=letters_reward(tokens), out_dir=tmp_path / "rl"
    )
    split = json.loads((warm / "users.json").read_text())
    assert json.loads((run / "users.json").read_text()) == split
    rl_config_file = json.loads((run / "run.json").read_text())["rl_run"]
    assert rl_config_file["steps_done"] == 2 and not set(rl_config_file["pool"]) & set(split["test"] + split["valid"])
    history = json.loads((run / "rl_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and all("reward_total" in h and "kl" in h for h in history)
    vocabulary = PreferenceVocabulary(tokens)
    before = load_text_generator(warm, vocabulary, load_settings("text", config)).token_embeddings()
    after = load_text_generator(run, vocabulary, load_settings("text", config)).token_embeddings()
    assert after.shape == before.shape and not torch.allclose(after, before)
    # the saved adapter holds exactly the embeddings RL ended with (the checkpoint's tensors on the warm-up model)
    from safetensors.torch import load_file

    from recbole_dppmg.generation.rl.common import FrozenReference

    final, _ = FrozenReference.split(load_file(str(run / "checkpoint" / "tensors.safetensors")))
    lm = load_text_generator(warm, vocabulary, load_settings("text", config))
    named = rl_text.token_parameters(lm)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(final[name])
    assert torch.allclose(lm.token_embeddings(), after, atol=1e-6)
    assert (run / "soft_prompt" / "soft_prompt.safetensors").is_file()
    # resuming a finished run returns it; changed settings or an occupied folder are refused
    assert (
        rl_text.train_text_rl(
            "tiny-text", None, None, {**settings, "resume": str(run)}, reward_fn=letters_reward(tokens)
        )
        == run
    )
    with pytest.raises(CheckpointError, match="rl.train_deltas was True, now False"):
        rl_text.train_text_rl(
            "tiny-text",
            None,
            None,
            {**settings, "resume": str(run), "train_deltas": False},
            reward_fn=letters_reward(tokens),
        )
    with pytest.raises(CheckpointError, match="rl.learning_rate"):
        rl_text.train_text_rl(
            "tiny-text",
            None,
            None,
            {**settings, "resume": str(run), "learning_rate": 1.0},
            reward_fn=letters_reward(tokens),
        )
    with pytest.raises(CheckpointError, match="already holds a text RL run"):
        rl_text.train_text_rl("tiny-text", warm, None, settings, reward_fn=letters_reward(tokens), out_dir=run)
    with pytest.raises(DataError, match="needs a judge"):
        rl_text.train_text_rl("tiny-text", warm, None, settings, out_dir=tmp_path / "other")


@pytest.mark.parametrize("conditioning", ["tokens", "retrieval"])
def test_train_image_rl_writes_a_loadable_generator(tmp_path, conditioning):
    """A retrieval generator tunes the same token tensors (its retrieved posters follow the tokens)."""
    from recbole_dppmg.generation.image.train import (
        load_image_generator,
        train_image_generator,
    )

    export = write_tiny_export(tmp_path / "tokens", n_users=8)
    posters = write_tiny_posters(tmp_path / "posters")
    config = tiny_settings(tmp_path, conditioning=conditioning, retrieval_k=2)
    source = train_image_generator("tiny", export, config, out_dir=tmp_path / "gen", posters=posters)
    tokens = PreferenceTokens.load(export)
    settings = {"steps": 2, "users_per_step": 2, "group_size": 2, "sample_steps": 3, "save_steps": 1, "progress": False}
    run = rl_image.train_image_rl(
        "tiny", source, None, settings, reward_fn=colour_reward(tokens), codec=PixelCodec(), out_dir=tmp_path / "rl"
    )
    vocab = PreferenceVocabulary(tokens)
    tuned, meta = load_image_generator(run, vocab, dataset="tiny")
    original, _ = load_image_generator(source, vocab, dataset="tiny")
    assert (
        meta["rl"]["steps"] == 2 and meta["test_users"] == json.loads((source / "run.json").read_text())["test_users"]
    )
    a, b = original.state_dict(), tuned.state_dict()
    assert {k for k in a if not torch.equal(a[k], b[k])} == {
        "slot",
        "projection.linear.weight",
        "projection.linear.bias",
    }
    pool = json.loads((run / "run.json").read_text())["rl_run"]["pool"]
    assert pool and not set(pool) & set(meta["heldout_users"])
    assert len(json.loads((run / "rl_history.json").read_text())) == 2


def test_image_rl_refuses_the_history_baseline(tmp_path):
    from recbole_dppmg.generation.image.train import train_image_generator

    export = write_tiny_export(tmp_path / "tokens", n_users=8)
    posters = write_tiny_posters(tmp_path / "posters")
    config = tiny_settings(tmp_path, conditioning="history", retrieval_k=2)
    source = train_image_generator("tiny", export, config, out_dir=tmp_path / "gen", posters=posters)
    settings = {"steps": 1, "users_per_step": 2, "group_size": 2, "sample_steps": 3, "progress": False}
    with pytest.raises(ConfigError, match="history generator .* nothing to tune"):
        rl_image.train_image_rl(
            "tiny", source, None, settings, reward_fn=colour_reward(PreferenceTokens.load(export)), codec=PixelCodec()
        )


# ---------------------------------------------------------------------------- settings, reward plumbing
def test_rl_config_refuses_bad_settings():
    assert rl_phase_settings("text", quick=True)["steps"] < rl_phase_settings("text")["steps"]
    with pytest.raises(ConfigError, match="unknown RL setting rl.text.stepz"):
        rl_phase_settings("text", {"stepz": 3})
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        rl_phase_settings("image", {"group_size": 1})
    with pytest.raises(ConfigError, match="advantage_scale"):
        rl_phase_settings("image", {"advantage_scale": "median"})
    with pytest.raises(ConfigError, match="text or image"):
        rl_phase_settings("audio")


class RecordingJudge:
    def __init__(self):
        self.calls = []

    def reward(self, users, text_features=None, image_features=None, partner=None):
        self.calls.append((list(users), text_features, image_features))
        personal = text_features[:, 0]
        return {
            "text_personalization": personal,
            "consistency": (text_features * image_features).sum(1),
            "total": personal,
        }


def test_judge_reward_holds_the_partner_modality_fixed():
    judge = RecordingJudge()
    partner = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.0, 1.0], np.float32)}
    reward = JudgeReward(judge, "text", lambda texts: np.array([[len(t), 1.0] for t in texts]), partner)
    out = reward(["a", "b", "a"], ["xx", "y", "zzz"])
    np.testing.assert_allclose(out["total"], [2, 1, 3])
    np.testing.assert_allclose(out["consistency"], [2, 1, 3])
    np.testing.assert_allclose(judge.calls[0][2], [[1, 0], [0, 1], [1, 0]])
    with pytest.raises(DataError, match="no pre-RL image content"):
        reward(["c"], ["x"])


def test_cached_features_compute_once(tmp_path):
    calls = []

    def compute(users):
        calls.append(list(users))
        return np.arange(len(users) * 2, dtype=np.float32).reshape(len(users), 2)

    first = cached_features("poster", {"run": "x"}, ["1", "2"], compute, cache_dir=tmp_path)
    second = cached_features("poster", {"run": "x"}, ["1", "2"], compute, cache_dir=tmp_path)
    assert len(calls) == 1 and all(np.array_equal(first[u], second[u]) for u in first)
    cached_features("poster", {"run": "y"}, ["1", "2"], compute, cache_dir=tmp_path)
    assert len(calls) == 2  # another generator is another cache entry
