"""DDPO-style reinforcement learning of the image generator's token conditioning.

Sampling is a Markov chain of Gaussian transitions: DDIM with ``eta`` > 0 (diffusers'
``DDIMScheduler``; :func:`ddim_transition` gives the mean and standard deviation of
``x_{t-1} | x_t`` under the current conditioning, the same numbers ``DDIMScheduler.step``
uses). Each step draws ``users_per_step`` training users, samples ``group_size`` posters per
user (different noise), keeps every transition's latents and log-prob, decodes the posters
and rewards them with the judge (poster personalization + consistency with the user's pre-RL
text, see ``rl_common``). Advantages are normalised per user group and clipped. Then, for
``inner_epochs`` passes, every (or a ``timestep_fraction`` of the) stochastic transition is
re-scored with gradients and the PPO objective on the per-transition likelihood ratio is
minimised, as in DDPO (Black et al. 2023): ``-min(rho A, clip(rho, 1 +- eps) A)``; log-probs
are means over the latent dimensions, hence DDPO's tiny ``clip_range``. Optionally a KL term
to the pre-RL transition (Gaussians of equal variance: ``|mu - mu_ref|^2 / 2 sigma^2``).

Only the token conditioning moves: the codebook projection and the slot embeddings (and the
null sequence when ``train_null``); the UNet, the latent statistics and the autoencoder stay
bit-identical (a retrieval generator's context posters follow the tokens; their projection stays
frozen too). TRL dropped its DDPO trainer, and it targeted Stable Diffusion pipelines; this
is the same algorithm on ``PosterDiffusion`` and, for a Stable Diffusion backbone, on
``sd.SDPosterModel``: there the new token rows of the text encoder move, the DDIM steps go through
the pipeline's UNet with the text encoder's states as conditioning, and UNet, VAE and text encoder
stay frozen. The small model runs RL on the CPU, a Stable Diffusion run on its ``image.sd.device``.

Run folder ``saved/<dataset>/ImageRL-<time>/`` loads like a trained image generator
(``image_train.load_image_generator``): ``model.safetensors`` + ``run.json`` (the generator's record with
an ``rl`` entry, and the RL run's own under ``rl_run``), ``rl_history.json`` and ``checkpoint/``.

The stochastic DDIM sampler here does not clip the predicted x0 (``clip_sample=False``): the
model works on standardised latents, which are not confined to [-1, 1].
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from recbole_dppmg.data.featurize import load_default_encoder, torch_threads
from recbole_dppmg.devices import module_device
from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import load_settings, rl_phase_settings
from recbole_dppmg.generation.common.user_split import split_seed, split_users
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.checkpoint import read_image_config
from recbole_dppmg.generation.image.checkpoint import save_checkpoint as save_generator
from recbole_dppmg.generation.image.data import tensor_to_pil
from recbole_dppmg.generation.image.generate import effective_strength
from recbole_dppmg.generation.image.metrics import image_features
from recbole_dppmg.generation.image.model import sdedit_skip
from recbole_dppmg.generation.image.train import (
    load_image_generator,
    run_codec,
    run_image_settings,
)
from recbole_dppmg.generation.rl.common import (
    JudgeReward,
    claim_run_folder,
    finish_progress,
    pre_rl_text_features,
    resume_or_start,
    reward_advantages,
    reward_table,
    save_progress,
    start_or_resume,
    step_record,
    step_users,
    user_pool,
)
from recbole_dppmg.generation.text.config import newest_generator_run
from recbole_dppmg.paths import SAVED_DIR
from recbole_dppmg.runs import (
    IMAGE_RL,
    RL_KINDS,
    RL_SECTION,
    new_run_folder,
    read_run_meta,
    write_run_meta,
)
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

RUN_PREFIX = IMAGE_RL.name
RESUME_KEYS = (
    "users_per_step",
    "group_size",
    "user_pool",
    "learning_rate",
    "clip_range",
    "advantage_clip",
    "kl_weight",
    "inner_epochs",
    "sample_steps",
    "eta",
    "guidance_scale",
    "sdedit_strength",
    "sdedit_blend",
    "timestep_fraction",
    "train_null",
    "advantage_scale",
    "grad_clip",
    "seed",
    "partner",
)


# ---------------------------------------------------------------------------- the stochastic sampler
def ddim_scheduler(model, steps: int):
    """DDIM over the model's training noise schedule, without x0 clipping."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.train_scheduler().config, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def ddim_transition(
    scheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, float]:
    """Mean and standard deviation of ``x_{t-1} | x_t`` for DDIM with ``eta`` (formulas (12)
    and (16) of Song et al.; the same as ``DDIMScheduler.step``), differentiable in
    ``model_output``. ``std`` is 0 at the last step when the schedule ends at alpha = 1."""
    timestep = int(timestep)
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[timestep].item()
    alpha_prev = scheduler.alphas_cumprod[prev].item() if prev >= 0 else float(scheduler.final_alpha_cumprod)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0 = (sample - math.sqrt(1 - alpha) * model_output) / math.sqrt(alpha)
        eps = model_output
    elif prediction == "v_prediction":
        x0 = math.sqrt(alpha) * sample - math.sqrt(1 - alpha) * model_output
        eps = math.sqrt(alpha) * model_output + math.sqrt(1 - alpha) * sample
    else:
        raise ConfigError(f"image RL supports epsilon or v_prediction models, not {prediction!r}")
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    std = eta * math.sqrt(max(variance, 0.0))
    mean = math.sqrt(alpha_prev) * x0 + math.sqrt(max(1 - alpha_prev - std**2, 0.0)) * eps
    return mean, std


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """``[B]``: log N(x; mean, std^2 I) averaged over the non-batch dimensions (DDPO's scale)."""
    logp = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, x.ndim)))


def guided_output(
    model, x: torch.Tensor, timestep, cond: torch.Tensor, null: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The UNet's prediction with classifier-free guidance towards ``cond`` (off at 1.0)."""
    t = torch.as_tensor(timestep, device=x.device)
    if guidance == 1.0:
        return model(x, t.expand(len(x)), cond)
    uncond, conditioned = model(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([null, cond])).chunk(2)
    return uncond + guidance * (conditioned - uncond)


@dataclass
class Trajectories:
    """Sampled chains: transition ``k`` goes from ``starts[:, k]`` to ``ends[:, k]`` at
    ``timesteps[k]``; only the stochastic transitions (``std > 0``) are kept for training."""

    starts: torch.Tensor  # [B, K, C, h, w]
    ends: torch.Tensor  # [B, K, C, h, w]
    logps: torch.Tensor  # [B, K] at sampling time
    timesteps: list[int]
    stds: list[float]
    final: torch.Tensor  # [B, C, h, w] the sampled (normalised) latents


@torch.no_grad()
def sample_trajectories(
    model,
    scheduler,
    positions: torch.Tensor,
    eta: float,
    guidance: float,
    generator: torch.Generator,
    strength: float = 1.0,
    blend: int = 1,
) -> Trajectories:
    """Posters' latents for token ``positions`` with every transition's log-prob (noise from
    ``generator``); ``strength`` < 1: the chains start SDEdit-style from the mean of the users' first
    ``blend`` context posters, as :func:`generate.generate_posters` does."""
    cond = model.condition(positions)
    null = model.unconditional(len(cond))
    shape, device = (len(positions), model.latent_channels, *model.latent_size), module_device(model)
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if strength < 1.0:
        # the last DDIM step is deterministic: keep at least one stochastic transition to train on
        timesteps = timesteps[min(sdedit_skip(len(timesteps), strength), max(0, len(timesteps) - 2)) :]
        x = scheduler.add_noise(model.init_latents(positions, blend=blend).to(x), x, timesteps[:1].expand(len(x)))
    starts, ends, logps, steps, stds = [], [], [], [], []
    for t in timesteps:
        out = guided_output(model, x, t, cond, null, guidance)
        mean, std = ddim_transition(scheduler, out, int(t), x, eta)
        if std > 0:
            following = mean + std * torch.randn(shape, generator=generator).to(device)
            starts.append(x)
            ends.append(following)
            logps.append(gaussian_logprob(following, mean, std))
            steps.append(int(t))
            stds.append(std)
        else:  # the deterministic last step of a schedule that ends at alpha = 1
            following = mean
        x = following
    if not steps:
        raise ConfigError("image RL needs stochastic denoising steps: set rl.image.eta > 0")
    return Trajectories(torch.stack(starts, 1), torch.stack(ends, 1), torch.stack(logps, 1), steps, stds, x)


def ppo_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, float]:
    """DDPO's clipped objective for one transition, averaged over the batch; and the clipped share."""
    ratio = torch.exp(logps - old_logps)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    return loss, float(((ratio - 1).abs() > clip_range).float().mean())


# ---------------------------------------------------------------------------- training loop
def conditioning_parameters(model, train_null: bool = False) -> dict[str, torch.nn.Parameter]:
    """The tensors RL moves (everything else frozen): the model's ``token_parameters`` (the small
    model: projection, slot and optionally null embeddings; Stable Diffusion: the new token rows)."""
    model.requires_grad_(False)
    named = model.token_parameters(train_null)
    for p in named.values():
        p.requires_grad_(True)
    return named


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.default_rng([seed, step, 11]).integers(2**31 - 1))


def run_image_rl(model, codec, vocab, reward_fn: Callable, pool: Sequence[str], cfg: dict, folder: Path) -> dict:
    """RL of ``model``'s conditioning for ``cfg["steps"]`` steps (resuming from
    ``folder/checkpoint``); ``reward_fn(users, posters [N, 3, H, W] in [-1, 1])``."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    model.eval()
    named = conditioning_parameters(model, cfg["train_null"])
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg["learning_rate"], weight_decay=0.0)
    state, reference = start_or_resume(folder, named, optimizer)
    if state["step"] >= cfg["steps"]:  # done (a larger rl.*.steps continues a finished run)
        return state

    params = list(named.values())
    group, guidance, eta = int(cfg["group_size"]), float(cfg["guidance_scale"]), float(cfg["eta"])
    scheduler = ddim_scheduler(model, int(cfg["sample_steps"]))
    strength = effective_strength(model, float(cfg["sdedit_strength"]))
    budget = float(cfg["max_minutes"]) * 60 if cfg.get("max_minutes") else float("inf")
    started = time.perf_counter()
    bar = tqdm(total=cfg["steps"], initial=state["step"], desc="image RL", unit="step", disable=not cfg["progress"])
    while state["step"] < cfg["steps"]:
        if time.perf_counter() - started > budget:
            state["stopped"] = "max_minutes"
            break
        tick = time.perf_counter()
        step = state["step"]
        users = [u for u in step_users(pool, cfg["users_per_step"], cfg["seed"], step) for _ in range(group)]
        positions = torch.tensor([vocab.ids_for(u) for u in users], dtype=torch.long)
        generator = torch.Generator().manual_seed(_step_seed(cfg["seed"], step))
        traj = sample_trajectories(
            model, scheduler, positions, eta, guidance, generator, strength, int(cfg["sdedit_blend"])
        )
        with torch.no_grad():
            posters = codec.decode(model.denormalise(traj.final))
        rewards = reward_table(reward_fn(users, posters))
        advantages = reward_advantages(rewards, group, cfg["advantage_scale"], getattr(reward_fn, "weights", None))
        adv = torch.tensor(advantages, dtype=torch.float32).clamp(-cfg["advantage_clip"], cfg["advantage_clip"])
        adv = adv.to(module_device(model))
        ref_cond = None
        if cfg["kl_weight"]:
            with reference.active(), torch.no_grad():
                ref_cond = model.condition(positions)
                ref_null = model.unconditional(len(ref_cond)).clone()
        n_train = max(1, round(cfg["timestep_fraction"] * len(traj.timesteps)))
        losses, clipped, kls = [], [], []
        for _ in range(int(cfg["inner_epochs"])):
            chosen = torch.randperm(len(traj.timesteps), generator=generator)[:n_train].tolist()
            optimizer.zero_grad(set_to_none=True)
            for k in chosen:
                x, following, t, std = traj.starts[:, k], traj.ends[:, k], traj.timesteps[k], traj.stds[k]
                cond = model.condition(positions)
                out = guided_output(model, x, t, cond, model.unconditional(len(cond)), guidance)
                mean, _ = ddim_transition(scheduler, out, t, x, eta)
                loss, share = ppo_loss(gaussian_logprob(following, mean, std), traj.logps[:, k], adv, cfg["clip_range"])
                if ref_cond is not None:
                    with torch.no_grad():
                        ref_mean, _ = ddim_transition(
                            scheduler, guided_output(model, x, t, ref_cond, ref_null, guidance), t, x, eta
                        )
                    kl = (((mean - ref_mean) ** 2) / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim))).mean()
                    kls.append(float(kl.detach()))
                    loss = loss + cfg["kl_weight"] * kl
                (loss / len(chosen)).backward()
                losses.append(float(loss.detach()))
                clipped.append(share)
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])) if cfg.get("grad_clip") else None
            )
            optimizer.step()
        seconds = time.perf_counter() - tick
        state["seconds"] += seconds
        state["step"] = step + 1
        extra = {
            "loss": float(np.mean(losses)),
            "clip_fraction": float(np.mean(clipped)),
            "kl": float(np.mean(kls)) if kls else None,
            "grad_norm": grad_norm,
            "seconds": round(seconds, 2),
        }
        state["history"].append(step_record(step + 1, rewards, advantages, group, **extra))
        bar.update(1)
        bar.set_postfix(reward=f"{np.mean(rewards['total']):.3f}")
        if state["step"] % int(cfg["save_steps"]) == 0:
            save_progress(folder, named, reference, optimizer, state)
    bar.close()
    return finish_progress(folder, named, reference, optimizer, state, cfg["steps"])


# ---------------------------------------------------------------------------- entry point
def train_image_rl(
    dataset: str,
    image_run: Path | None,
    judge,
    config: dict | None = None,
    quick: bool = False,
    reward_fn: Callable | None = None,
    codec=None,
    out_dir: Path | None = None,
) -> Path:
    """RL of the image generator ``image_run`` on its training users; returns the ``ImageRL-*`` folder.

    ``judge`` is a ``reward.PreferenceJudge``; partner texts come from ``rl.image.partner``
    (None = the newest ``TextGen-*``). ``reward_fn(users, posters)`` replaces the judge and
    ``codec`` the autoencoder (tests). ``rl.image.resume`` continues an ``ImageRL-*`` folder.
    The new run goes to ``out_dir`` or ``saved/<dataset>/ImageRL-<time>/``.
    """

    cfg = rl_phase_settings("image", config, quick)
    run, image_run = resume_or_start(
        "image", cfg, image_run, RESUME_KEYS, "a trained image generator (an ImageGen-* folder)"
    )
    with torch_threads(cfg["num_threads"]):
        meta = read_image_config(image_run)
        tokens = PreferenceTokens.load(meta["tokens_folder"], dataset=dataset)
        vocab = PreferenceVocabulary(tokens)
        model, meta = load_image_generator(image_run, vocab, dataset=dataset)
        if model.conditioning == "history":
            raise ConfigError(
                f"{image_run} is a history generator (image.conditioning=history): it reads no preference tokens, "
                "so image RL has nothing to tune; start RL from a tokens or retrieval generator"
            )
        train = meta["train"]
        split = split_users(list(tokens.users), train["valid_users"], train["test_users"], split_seed(train))
        if split["test"] != meta["test_users"]:
            raise CheckpointError(
                f"{image_run}: the user split recomputed from its settings differs from its recorded test users"
            )
        pool = user_pool(split["train"], cfg["user_pool"], cfg["seed"])
        partner_run, judged = None, reward_fn is None
        if judged:
            if judge is None:
                raise DataError("image RL needs a judge (reward.PreferenceJudge) or a reward_fn")

            partner_run = Path(cfg["partner"]) if cfg.get("partner") else newest_generator_run(dataset, SAVED_DIR)
            partner = pre_rl_text_features(dataset, partner_run, pool, cfg["num_threads"], cfg["progress"])
            encoder = load_default_encoder("image")
            reward_fn = JudgeReward(
                judge, "image", lambda posters: image_features(encoder, [tensor_to_pil(x) for x in posters]), partner
            )
        if codec is None:
            image_cfg = load_settings("image")
            settings = run_image_settings(meta, {k: image_cfg[k] for k in ("autoencoder_path", "poster_dir")})
            codec, _ = run_codec(model, meta, settings)
        if run is None:
            run = claim_run_folder("image", out_dir, lambda: new_run_folder(SAVED_DIR, dataset, RUN_PREFIX))
            record = {
                "dataset": dataset,
                "source_run": str(image_run.resolve()),
                "tokens": meta["tokens_folder"],
                "partner_run": str(partner_run) if partner_run else None,
                "pool": pool,
                "rl": cfg,
                "reward": judge.config if judged else "reward_fn",
            }
            write_run_meta(run, RUN_PREFIX, record, RL_SECTION)
        logger.info(
            "image RL in %s: %d steps x %d users x %d posters, pool of %d training users",
            run,
            cfg["steps"],
            cfg["users_per_step"],
            cfg["group_size"],
            len(pool),
        )
        state = run_image_rl(model, codec, vocab, reward_fn, pool, cfg, run)
        meta = {
            **meta,
            "source_checkpoint": str(image_run.resolve()),
            "rl": {
                "steps": state["step"],
                "seconds": round(state["seconds"], 1),
                "stopped": state["stopped"],
                "settings": cfg,
            },
        }
        save_generator(run, model.eval(), meta, kind=RUN_PREFIX)
    summary = read_run_meta(run, RL_KINDS, RL_SECTION)
    summary.update(
        rl=cfg,
        steps_done=state["step"],
        train_seconds=round(state["seconds"], 1),
        stopped=state["stopped"],
        num_threads=cfg["num_threads"],
    )
    write_run_meta(run, RUN_PREFIX, summary, RL_SECTION)
    logger.info(
        "image RL: %d steps in %.0f s (%s), saved in %s", state["step"], state["seconds"], state["stopped"], run
    )
    return run
