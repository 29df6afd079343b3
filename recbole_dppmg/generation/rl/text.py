"""GRPO-style reinforcement learning of the text generator's preference tokens.

Each step draws ``users_per_step`` training users, samples ``group_size`` texts per user from
the current policy, scores them with the reward (the stage-1 judge: personalization of the
text + consistency with the user's pre-RL poster, see ``rl_common``), turns the rewards into
group-normalised advantages (of the total, or of each component: ``advantage_scale``) and
takes ``inner_epochs`` gradient steps on

    mean over generated tokens of  -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * KL_k3

with ``rho`` the ratio to the sampling policy and ``KL_k3 = exp(ref - logp) - (ref - logp) - 1``
the per-token estimator of the KL to the run's starting policy (the warm-up adapter, or the
previous phase's policy under ``rl.text.then``). The mean runs over all generated tokens of
the batch, so long and short texts weigh by their tokens
(GRPO's per-sequence mean favours short answers). Texts are sampled from the tempered softmax
over the base vocabulary without nucleus truncation, so the log-probs of the loss are exactly
those of the sampling policy. Only token-associated tensors move: the PEFT trainable-token
deltas and the codebook projection (LoRA weights of the warm-up, if any, stay frozen), so the
reference is the same model with the warm-up values of those tensors written back for one
no-grad pass (``rl_common.FrozenReference``): no second model.

Why not TRL's ``GRPOTrainer``: it builds prompts from text and generates from ``input_ids``
(or through vLLM); our prompts are embedded by a conditioner (``inputs_embeds`` with the
preference tokens' current embeddings), the reward needs the user of each prompt and the
partner modality's content, and only a few hundred thousand token parameters train on a CPU.
The loss above is TRL's ``loss_type="bnpo"`` with ``beta`` > 0, written out in
:func:`grpo_loss` (a dozen lines, tested on hand-made cases) rather than adding TRL as a
dependency for it.

Run folder ``saved/<dataset>/TextRL-<time>/`` is a drop-in for a warm-up run
(``text_pipeline.load_text_generator``): ``dppmg/`` (adapter after RL), ``run.json`` (the
warm-up's record, and the RL run's own under ``rl_run``), ``users.json`` (the warm-up's split),
``soft_prompt/`` (copied, for the baselines), ``rl_history.json`` and ``checkpoint/``
(resumable every ``save_steps``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from recbole_dppmg.data.featurize import load_default_encoder, torch_threads
from recbole_dppmg.errors import CheckpointError, DataError
from recbole_dppmg.generation.common.settings import load_settings, rl_phase_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.generate import newest_image_run
from recbole_dppmg.generation.image.train import read_image_config
from recbole_dppmg.generation.rl.common import (
    JudgeReward,
    claim_run_folder,
    finish_progress,
    pre_rl_poster_features,
    resume_or_start,
    reward_advantages,
    reward_table,
    save_progress,
    start_or_resume,
    step_record,
    step_users,
    user_pool,
)
from recbole_dppmg.generation.text.config import saved_root
from recbole_dppmg.generation.text.generate import (
    TokenConditioner,
    left_pad,
    prompt_ids,
)
from recbole_dppmg.generation.text.loading import (
    load_text_generator,
    load_tokens,
    run_settings,
)
from recbole_dppmg.runs import (
    RL_KINDS,
    RL_SECTION,
    TEXT_RL,
    new_run_folder,
    read_run_meta,
    write_run_meta,
)

logger = logging.getLogger(__name__)

RUN_PREFIX = TEXT_RL.name
# settings a resumed run must share with the run it continues
RESUME_KEYS = (
    "users_per_step",
    "group_size",
    "user_pool",
    "learning_rate",
    "kl_weight",
    "clip_range",
    "inner_epochs",
    "temperature",
    "max_new_tokens",
    "advantage_scale",
    "train_deltas",
    "grad_clip",
    "seed",
    "partner",
)


# ---------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """A batch of sampled texts: ``group_size`` consecutive rows per user."""

    users: list[str]
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    completion: torch.Tensor  # [B, C] right-padded, the end-of-turn token included
    completion_mask: torch.Tensor
    texts: list[str]


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first end-of-turn token of each row, 0 after it."""
    is_eos = completion == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first eos
    return (~after).long()


@torch.no_grad()
def sample_rollout(
    lm, conditioner, users: Sequence[str], group_size: int, max_new_tokens: int, temperature: float, seed: int
) -> Rollout:
    """``group_size`` texts per user from the tempered softmax over the base vocabulary."""

    tokenizer = lm.tokenizer
    users = [str(u) for u in users for _ in range(group_size)]
    prompts = [prompt_ids(tokenizer, conditioner.token_text(u)) for u in users]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, lm.device)
    lm.model.eval()
    torch.manual_seed(seed)
    with conditioner.inference():
        embeds = conditioner.inputs_embeds(ids, users)
        out = lm.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            suppress_tokens=list(lm.token_ids),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    completion = out[:, -max_new_tokens:] if out.shape[1] > max_new_tokens else out
    keep = completion_mask(completion, tokenizer.eos_token_id)
    completion = torch.where(keep.bool(), completion, torch.full_like(completion, tokenizer.pad_token_id))
    texts = [t.strip() for t in tokenizer.batch_decode(completion, skip_special_tokens=True)]
    return Rollout(users, ids, mask, completion, keep, texts)


def completion_logprobs(lm, conditioner, rollout: Rollout, temperature: float) -> torch.Tensor:
    """``[B, C]`` log-probs of the sampled tokens under the current policy (the same tempered
    softmax over the base vocabulary that sampled them); positions follow the attention mask,
    as in ``generate``."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion], dim=1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    width = rollout.completion.shape[1]
    embeds = conditioner.inputs_embeds(ids, rollout.users)
    logits = lm.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1
    ).logits
    logits = logits[:, :-1, : conditioner.output_vocab].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, rollout.completion.unsqueeze(-1)).squeeze(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    ref_logps: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss + ``kl_weight`` x k3 KL to the reference, averaged over the
    batch's generated tokens (``mask``); advantages are per sequence ``[B]``."""
    mask = mask.to(logps.dtype)
    tokens = mask.sum().clamp_min(1.0)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    stats = {"clip_fraction": float((((ratio - 1).abs() > clip_range).to(mask.dtype) * mask).sum() / tokens)}
    if ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        stats["kl"] = float((kl.detach() * mask).sum() / tokens)
        if kl_weight:
            per_token = per_token + kl_weight * kl
    loss = (per_token * mask).sum() / tokens
    stats["loss"] = float(loss.detach())
    return loss, stats


# ---------------------------------------------------------------------------- training loop
def token_parameters(lm, deltas: bool = True) -> dict[str, torch.nn.Parameter]:
    """The tensors RL moves: PEFT trainable-token deltas (unless ``deltas`` is False) and the
    codebook projection. Everything else, warm-up LoRA included, is frozen. Why the projection
    alone: the delta rows of a user's codes get a gradient only when that user is drawn, and the
    shared prefix rows get one every step, so under a user-relative reward their steps are mostly
    noise that accumulates as drift (``bench_rl.py snr`` per tensor); the projection maps every
    user's codes and is where that reward's signal agrees from batch to batch."""
    if not any("trainable_tokens_delta" in name for name, _ in lm.model.named_parameters()):
        raise CheckpointError("the text generator has no trainable token parameters")
    for name, p in lm.model.named_parameters():
        p.requires_grad_(deltas and "trainable_tokens_delta" in name)
    named = {f"model.{n}": p for n, p in lm.model.named_parameters() if p.requires_grad}
    named.update({f"projection.linear.{n}": p for n, p in lm.projection.linear.named_parameters()})
    for p in named.values():
        p.requires_grad_(True)
    return named


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.default_rng([seed, step, 7]).integers(2**31 - 1))


def run_text_rl(lm, vocabulary, reward_fn: Callable, pool: Sequence[str], cfg: dict, folder: Path) -> dict:
    """RL of ``lm``'s token parameters for ``cfg["steps"]`` steps (resuming from
    ``folder/checkpoint`` when one exists); returns the state with its ``history``."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    conditioner = TokenConditioner(lm, vocabulary)
    named = token_parameters(lm, cfg["train_deltas"])
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg["learning_rate"], weight_decay=0.0)
    state, reference = start_or_resume(folder, named, optimizer)
    if state["step"] >= cfg["steps"]:  # done (a larger rl.*.steps continues a finished run)
        return state

    params = list(named.values())
    budget = float(cfg["max_minutes"]) * 60 if cfg.get("max_minutes") else float("inf")
    started = time.perf_counter()
    group = int(cfg["group_size"])
    bar = tqdm(total=cfg["steps"], initial=state["step"], desc="text RL", unit="step", disable=not cfg["progress"])
    while state["step"] < cfg["steps"]:
        if time.perf_counter() - started > budget:
            state["stopped"] = "max_minutes"
            break
        tick = time.perf_counter()
        step = state["step"]
        users = step_users(pool, cfg["users_per_step"], cfg["seed"], step)
        rollout = sample_rollout(
            lm, conditioner, users, group, cfg["max_new_tokens"], cfg["temperature"], _step_seed(cfg["seed"], step)
        )
        rewards = reward_table(reward_fn(rollout.users, rollout.texts))
        advantages = reward_advantages(rewards, group, cfg["advantage_scale"], getattr(reward_fn, "weights", None))
        adv = torch.tensor(advantages, dtype=torch.float32, device=lm.device)
        ref_logps = None
        if cfg["kl_weight"]:
            with reference.active(), torch.no_grad():
                ref_logps = completion_logprobs(lm, conditioner, rollout, cfg["temperature"])
        conditioner.train(True)
        old_logps, stats = None, {}
        for _ in range(int(cfg["inner_epochs"])):
            logps = completion_logprobs(lm, conditioner, rollout, cfg["temperature"])
            if old_logps is None:
                old_logps = logps.detach()  # the sampling policy: parameters have not moved yet
            loss, stats = grpo_loss(
                logps, old_logps, adv, rollout.completion_mask, cfg["clip_range"], ref_logps, cfg["kl_weight"]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.get("grad_clip"):
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]))
            optimizer.step()
        conditioner.train(False)
        seconds = time.perf_counter() - tick
        state["seconds"] += seconds
        state["step"] = step + 1
        state["history"].append(
            step_record(
                step + 1,
                rewards,
                advantages,
                group,
                **stats,
                completion_tokens=float(rollout.completion_mask.sum(1).float().mean()),
                seconds=round(seconds, 2),
            )
        )
        bar.update(1)
        bar.set_postfix(reward=f"{np.mean(rewards['total']):.3f}", kl=f"{stats.get('kl', 0.0):.4f}")
        if state["step"] % int(cfg["save_steps"]) == 0:
            save_progress(folder, named, reference, optimizer, state)
    bar.close()
    return finish_progress(folder, named, reference, optimizer, state, cfg["steps"])


# ---------------------------------------------------------------------------- entry point
def train_text_rl(
    dataset: str,
    text_run: Path | None,
    judge,
    config: dict | None = None,
    quick: bool = False,
    reward_fn: Callable | None = None,
    out_dir: Path | None = None,
) -> Path:
    """RL of the warm-up run ``text_run`` on its training users; returns the ``TextRL-*`` folder.

    ``judge`` is a ``reward.PreferenceJudge``; the partner posters come from ``rl.text.partner``
    (None = the newest ``ImageGen-*``). ``reward_fn(users, texts)`` replaces the judge (tests).
    ``rl.text.resume`` continues a ``TextRL-*`` folder. The new run goes to ``out_dir`` or
    ``<warm-up's checkpoint_dir>/<dataset>/TextRL-<time>/``.
    """

    cfg = rl_phase_settings("text", config, quick)
    run, text_run = resume_or_start("text", cfg, text_run, RESUME_KEYS, "a warm-up run (a TextGen-* folder)")
    source = run_settings(text_run)
    if not (text_run / "users.json").is_file():
        raise CheckpointError(f"{text_run} has no users.json (the user split); re-run the text warm-up")
    split = json.loads((text_run / "users.json").read_text())
    text_cfg = load_settings("text", {"num_threads": cfg["num_threads"], "progress": cfg["progress"]})
    pool = user_pool(split["train"], cfg["user_pool"], cfg["seed"])
    with torch_threads(cfg["num_threads"]):
        tokens = load_tokens(dataset, None, text_cfg, source["tokens"])
        vocabulary = PreferenceVocabulary(tokens)
        partner_run, judged = None, reward_fn is None
        if judged:
            if judge is None:
                raise DataError("text RL needs a judge (reward.PreferenceJudge) or a reward_fn")

            partner_run = Path(cfg["partner"]) if cfg.get("partner") else newest_image_run(dataset)
            partner_tokens = read_image_config(partner_run)["tokens_folder"]
            if Path(partner_tokens).resolve() != Path(source["tokens"]).resolve():
                logger.warning(
                    "the partner image generator %s was trained on tokens %s, the text generator on %s",
                    partner_run,
                    partner_tokens,
                    source["tokens"],
                )
            partner = pre_rl_poster_features(dataset, partner_run, pool, cfg["num_threads"], cfg["progress"])
            encoder = load_default_encoder("text")
            reward_fn = JudgeReward(
                judge, "text", lambda texts: encoder.encode([t or " " for t in texts], progress=False), partner
            )
        if run is None:
            root = saved_root(source.get("text", {}))
            run = claim_run_folder("text", out_dir, lambda: new_run_folder(root, dataset, RUN_PREFIX))
            write_run_meta(run, RUN_PREFIX, {**source, "rl": cfg, "source_run": str(text_run.resolve())})
            shutil.copy(text_run / "users.json", run / "users.json")
            record = {
                "dataset": dataset,
                "source_run": str(text_run.resolve()),
                "tokens": source["tokens"],
                "partner_run": str(partner_run) if partner_run else None,
                "pool": pool,
                "rl": cfg,
                "reward": judge.config if judged else "reward_fn",
            }
            write_run_meta(run, RUN_PREFIX, record, RL_SECTION)
        logger.info(
            "text RL in %s: %d steps x %d users x %d samples, pool of %d training users",
            run,
            cfg["steps"],
            cfg["users_per_step"],
            cfg["group_size"],
            len(pool),
        )
        lm = load_text_generator(text_run, vocabulary, text_cfg)
        state = run_text_rl(lm, vocabulary, reward_fn, pool, cfg, run)
        lm.save(run / "dppmg")
    if (text_run / "soft_prompt").is_dir() and not (run / "soft_prompt").exists():
        shutil.copytree(text_run / "soft_prompt", run / "soft_prompt", ignore=shutil.ignore_patterns("checkpoint"))
    summary = read_run_meta(run, RL_KINDS, RL_SECTION)
    summary.update(
        rl=cfg,
        steps_done=state["step"],
        train_seconds=round(state["seconds"], 1),
        stopped=state["stopped"],
        num_threads=cfg["num_threads"],
    )
    write_run_meta(run, RUN_PREFIX, summary, RL_SECTION)
    logger.info("text RL: %d steps in %.0f s (%s), saved in %s", state["step"], state["seconds"], state["stopped"], run)
    return run
