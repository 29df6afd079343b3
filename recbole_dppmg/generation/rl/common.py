"""What text RL (``rl_text``) and image RL (``rl_image``) share.

- group-normalised advantages (GRPO; DDPO's per-prompt statistics are the same thing);
- a frozen copy of the trainable tensors at the start of RL: the reference policy. Only
  token-associated tensors move, so writing the copy back for one no-grad pass *is* the
  pre-RL model; no second model is kept;
- resumable checkpoints as plain state dicts + JSON (``weights_only=True`` loadable);
- the reward: the stage-1 judge (``reward.PreferenceJudge``) on the features of the generated
  content, with the *other* modality's content of the same user held fixed for the
  consistency term. That partner content is what the other generator wrote for the user
  before any RL (one sample, its own default sampling settings and seed), computed once per
  user list and cached under ``.cache/rl_partner/``. Fixing it keeps the reward a function
  of the tuned modality only (no moving target, no coupling of the two RL runs) and makes
  the consistency term mean "agree with what the other generator says about this user".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recbole_dppmg.data.featurize import load_default_encoder, torch_threads
from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
from recbole_dppmg.generation.image.checkpoint import WEIGHTS_FILE, read_image_config
from recbole_dppmg.generation.image.data import tensor_to_pil
from recbole_dppmg.generation.image.generate import (
    GENERATE_KEYS,
    generate_posters,
    sampling_arguments,
    user_context,
    user_positions,
)
from recbole_dppmg.generation.image.metrics import image_features
from recbole_dppmg.generation.image.train import (
    load_image_generator,
    run_codec,
    run_image_settings,
)
from recbole_dppmg.generation.text.generate import TokenConditioner, generate_texts
from recbole_dppmg.generation.text.injection import META
from recbole_dppmg.generation.text.loading import (
    generation_options,
    load_text_generator,
    load_tokens,
    run_settings,
)
from recbole_dppmg.paths import CACHE_DIR
from recbole_dppmg.runs import RL_KINDS, RL_SECTION, RUN_META, meta_path, read_run_meta
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

HISTORY_FILE, CHECKPOINT = "rl_history.json", "checkpoint"


# ---------------------------------------------------------------------------- advantages
def next_phase(overrides: dict, cfg: dict) -> dict | None:
    """The overrides of the phase after the one ``rl_phase_settings(modality, overrides)`` gave as
    ``cfg``: ``overrides`` + ``cfg["then"]``, with ``then`` cleared. None when ``cfg`` is the last
    phase. That phase starts from the first phase's run (its policy is the new KL reference)."""
    then = cfg.get("then")
    if not then:
        return None
    return {**{k: v for k, v in (overrides or {}).items() if k != "resume"}, **then, "then": None}


def group_advantages(rewards: Sequence[float], group_size: int, scale: str = "group", eps: float = 1e-4) -> np.ndarray:
    """``(r - mean of its group) / (std + eps)`` for rewards laid out group after group.

    ``scale``: ``group`` divides by the group's std (GRPO), ``batch`` by the std of the whole
    batch (less noisy when groups are small), ``none`` only centres. A group whose rewards are
    all equal gets zero advantages: it carries no signal. Anything constant per group (for
    example the personalization of the fixed partner modality) cancels exactly.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if group_size < 2 or r.size % group_size:
        raise DataError(f"{r.size} rewards do not form groups of {group_size} (>= 2)")
    groups = r.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        std = groups.std(axis=1, ddof=1, keepdims=True)
    elif scale == "batch":
        std = np.full((len(groups), 1), r.std(ddof=1) if r.size > 1 else 0.0)
    elif scale == "none":
        std = np.full((len(groups), 1), 1.0 - eps)
    else:
        raise ConfigError(f"advantage scale must be group, batch or none, got {scale!r}")
    return (centred / (std + eps)).reshape(-1)


def reward_advantages(
    rewards: dict[str, np.ndarray],
    group_size: int,
    scale: str = "group",
    weights: dict[str, float] | None = None,
    eps: float = 1e-4,
) -> np.ndarray:
    """The advantages of one batch from its reward table (``reward_table``).

    ``group`` / ``batch`` / ``none``: :func:`group_advantages` of the ``total``. ``component``
    (decoupled normalisation, as in GDPO): every component is group-normalised on its own, the
    results are summed with ``weights`` (default 1) and the sum is divided by its batch std.
    Why: the total's spread inside a group is the spread of its widest component. On
    ml-100k-mm the judge percentile of a text spreads ~4.5x more within a group (std ~0.21)
    than its consistency with the partner poster (~0.047; ``group_std_*`` in
    ``rl_history.json``), so normalising the total lets the judge steer almost every update,
    even at equal weights. A component that is constant within a group (the fixed partner's
    personalization) gets zero advantage either way.
    """
    if scale != "component":
        return group_advantages(rewards["total"], group_size, scale, eps)
    parts = [k for k in rewards if k != "total"] or ["total"]
    weights = weights or {}
    summed = sum(float(weights.get(k, 1.0)) * group_advantages(rewards[k], group_size, "group", eps) for k in parts)
    spread = float(np.std(summed, ddof=1)) if summed.size > 1 else 0.0
    return summed / (spread + eps)


def reward_table(output) -> dict[str, np.ndarray]:
    """A reward callable's result as ``{component: [N]}`` with a ``total``; a bare array is the total."""
    if isinstance(output, dict):
        if "total" not in output:
            raise DataError(f"the reward returned no 'total' (got {', '.join(output)})")
        return {k: np.asarray(v, dtype=np.float64) for k, v in output.items()}
    return {"total": np.asarray(output, dtype=np.float64)}


def step_record(
    step: int, rewards: dict[str, np.ndarray], advantages: np.ndarray, group_size: int | None = None, **extra
) -> dict:
    """One ``rl_history.json`` entry: the mean of every reward component, with ``group_size``
    also each component's mean spread inside a group (what the advantages see), and the
    advantage std."""
    record = {"step": step}
    record.update({f"reward_{k}": round(float(np.mean(v)), 6) for k, v in rewards.items()})
    if group_size:
        record.update(
            {
                f"group_std_{k}": round(float(np.mean(np.reshape(v, (-1, group_size)).std(axis=1, ddof=1))), 6)
                for k, v in rewards.items()
                if k != "total" and np.size(v) % group_size == 0
            }
        )
    record["reward_std"] = round(float(np.std(rewards["total"])), 6)
    record["advantage_std"] = round(float(np.std(advantages)), 6)
    record.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in extra.items()})
    return record


# ---------------------------------------------------------------------------- reference policy
class FrozenReference:
    """The trainable tensors' values when RL started.

    ``with reference.active():`` writes them into the live parameters and restores the current
    values afterwards: a forward pass inside is the pre-RL policy. Use it only where no autograd
    graph holds the parameters (the values are swapped in place).
    """

    PREFIX = "reference."

    def __init__(self, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor] | None = None):
        self.params = params
        source = values if values is not None else {n: p.detach() for n, p in params.items()}
        if set(source) != set(params):
            raise CheckpointError("the saved reference policy does not match the trainable tensors")
        self.values = {n: source[n].detach().clone().to(params[n].device) for n in params}

    @contextlib.contextmanager
    def active(self):
        current = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.values[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(current[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + n: v for n, v in self.values.items()}

    @classmethod
    def split(cls, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(trainable values, reference values) of a saved checkpoint."""
        ref = {k[len(cls.PREFIX) :]: v for k, v in tensors.items() if k.startswith(cls.PREFIX)}
        return {k: v for k, v in tensors.items() if not k.startswith(cls.PREFIX)}, ref


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    folder: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Tensors (safetensors), optimizer + torch RNG (a plain state dict), then ``state.json``
    last: a readable state means a complete checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / "tensors.safetensors.tmp"))
    os.replace(folder / "tensors.safetensors.tmp", folder / "tensors.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, folder / "optimizer.pt.tmp")
    os.replace(folder / "optimizer.pt.tmp", folder / "optimizer.pt")
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=2))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
    """``(tensors, {"optimizer", "torch_rng"}, state)`` or None when there is no complete checkpoint."""
    if not (folder / "state.json").is_file():
        return None
    try:
        tensors = load_file(str(folder / "tensors.safetensors"))
        extra = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"RL checkpoint {folder} is unreadable: {exc}") from None
    return tensors, extra, json.loads((folder / "state.json").read_text())


def start_or_resume(
    folder: Path, named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> tuple[dict, FrozenReference]:
    """A fresh RL state and the reference (the current values), or both as ``folder/checkpoint``
    left them, with the trainable tensors, optimizer and torch RNG restored."""
    saved = load_checkpoint(folder / CHECKPOINT)
    if saved is None:
        return {"step": 0, "seconds": 0.0, "history": [], "finished": False, "stopped": None}, FrozenReference(named)
    tensors, extra, state = saved
    values, ref_values = FrozenReference.split(tensors)
    if set(values) != set(named):
        raise CheckpointError(
            f"{folder / CHECKPOINT} was written for other trainable tensors (another generator or vocabulary)"
        )
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(values[n])
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["torch_rng"])
    logger.info("RL resumed at step %d from %s", state["step"], folder / CHECKPOINT)
    return state, FrozenReference(named, ref_values)


def save_progress(
    folder: Path, named: dict[str, torch.nn.Parameter], reference: FrozenReference, optimizer, state: dict
) -> None:
    """The resumable checkpoint and ``rl_history.json``."""
    save_checkpoint(folder / CHECKPOINT, {**named, **reference.state_dict()}, optimizer, state)
    write_json(folder / HISTORY_FILE, state["history"])


def finish_progress(folder: Path, named, reference, optimizer, state: dict, steps: int) -> dict:
    """The last save of an RL run: finished when all ``steps`` are done (else it stopped on time)."""
    state["finished"] = state["step"] >= steps
    if state["finished"]:
        state["stopped"] = "steps"
    save_progress(folder, named, reference, optimizer, state)
    return state


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# what RL runs recorded before a setting existed ran with (read into their records)
PREDATING = {"text": {"train_deltas": True}, "image": {}, "reward": {"relative": False}}


def recorded_settings(kind: str, settings: dict) -> dict:
    """``rl.<kind>`` (or, with kind ``reward``, ``reward:``) settings with the values of settings
    that did not exist yet filled in."""
    return {**PREDATING[kind], **settings} if isinstance(settings, dict) else settings


def check_resume(run: Path, previous: dict, cfg: dict, keys: Sequence[str], kind: str = "text") -> None:
    """Refuse to resume a run whose result would depend on settings that changed."""
    recorded, cfg = recorded_settings(kind, previous["rl"]), recorded_settings(kind, cfg)
    for key in keys:
        if recorded.get(key) != cfg.get(key):
            raise CheckpointError(f"cannot resume {run}: rl.{key} was {recorded.get(key)!r}, now {cfg.get(key)!r}")


def _a(kind: str) -> str:
    """ "a text" / "an image"."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def resume_or_start(
    kind: str, cfg: dict, source_run: Path | None, keys: Sequence[str], source_what: str
) -> tuple[Path | None, Path]:
    """``(RL run to continue or None, generator run it starts from)``: ``rl.<kind>.resume``
    names a run whose recorded source wins; otherwise ``source_run`` is required."""
    if cfg.get("resume"):
        run = Path(cfg["resume"])
        previous = read_run_meta(run, RL_KINDS, RL_SECTION)
        if previous is None:
            raise CheckpointError(f"{run} is not {_a(kind)} RL run (no {RUN_META}); nothing to resume")
        check_resume(run, previous, cfg, keys, kind)
        return run, Path(previous["source_run"])
    if source_run is None:
        raise DataError(f"{kind} RL needs {source_what}")
    return None, Path(source_run)


def claim_run_folder(kind: str, out_dir: Path | None, default: Callable[[], Path]) -> Path:
    """The folder of a new RL run: ``out_dir`` (refused if it already holds one) or ``default()``."""
    if out_dir is None:
        return default()
    run = Path(out_dir)
    if meta_path(run, RL_KINDS, RL_SECTION) is not None:
        raise CheckpointError(
            f"{run} already holds {_a(kind)} RL run; resume it (rl.{kind}.resume) or choose another folder"
        )
    run.mkdir(parents=True, exist_ok=True)
    return run


def user_pool(train_users: Sequence[str], size: int, seed: int) -> list[str]:
    """The training users RL draws prompts from: a seeded sample of ``size`` of them."""
    users = [str(u) for u in train_users]
    if not users:
        raise DataError("RL needs training users; the generator's split has none")
    order = np.random.default_rng(seed).permutation(len(users))[: min(size, len(users))]
    return [users[k] for k in sorted(order)]


def step_users(pool: Sequence[str], count: int, seed: int, step: int) -> list[str]:
    """The users of one step: a pure function of (seed, step), so a resumed run sees the same ones."""
    rng = np.random.default_rng([seed, step])
    return [pool[k] for k in rng.choice(len(pool), min(count, len(pool)), replace=False)]


# ---------------------------------------------------------------------------- reward
class JudgeReward:
    """``reward(users, outputs)`` for RL of ``modality``: the judge on ``featurize(outputs)``
    with the partner modality's fixed features of the same users (the consistency term)."""

    def __init__(
        self,
        judge,
        modality: str,
        featurize: Callable[[Sequence], np.ndarray],
        partner: dict[str, np.ndarray] | None = None,
    ):
        self.judge, self.modality, self.featurize, self.partner = judge, modality, featurize, partner
        self.other = "image" if modality == "text" else "text"
        # the reward's component weights, for rl.*.advantage_scale: component
        self.weights = {
            k[: -len("_weight")]: float(v) for k, v in getattr(judge, "config", {}).items() if k.endswith("_weight")
        }

    def __call__(self, users: Sequence[str], outputs: Sequence) -> dict[str, np.ndarray]:
        features = {f"{self.modality}_features": np.asarray(self.featurize(outputs), dtype=np.float32)}
        if self.partner is not None:
            missing = [u for u in users if u not in self.partner]
            if missing:
                raise DataError(f"no pre-RL {self.other} content for users {missing[:5]}")
            features[f"{self.other}_features"] = np.stack([self.partner[u] for u in users])
        partner = self.other if self.partner is not None else None
        return reward_table(self.judge.reward(list(users), **features, partner=partner))


def cached_features(
    kind: str,
    descriptor: dict,
    users: Sequence[str],
    compute: Callable[[list[str]], np.ndarray],
    cache_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """``{user: feature row}`` from ``compute(users)``, cached by (descriptor, user list): the
    same generator, settings and users give the same content, so it is computed once."""
    users = [str(u) for u in users]
    key = hashlib.sha256(
        json.dumps({"kind": kind, **descriptor, "users": users}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir or CACHE_DIR / "rl_partner") / f"{kind}-{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            if [str(u) for u in stored["users"]] == users:
                return dict(zip(users, stored["features"]))
    features = np.asarray(compute(users), dtype=np.float32)
    if features.shape[0] != len(users):
        raise DataError(f"{kind}: computed {features.shape[0]} feature rows for {len(users)} users")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, users=np.array(users), features=features)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(
        json.dumps({"kind": kind, **descriptor, "users": len(users)}, indent=2, default=str)
    )
    return dict(zip(users, features))


def _file_stamp(path: Path) -> str:
    stat = Path(path).stat()
    return f"{stat.st_size}:{int(stat.st_mtime)}"


def pre_rl_poster_features(
    dataset: str,
    image_run: Path,
    users: Sequence[str],
    num_threads: int | None = 1,
    progress: bool = True,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """EfficientNet features of one poster per user from the image generator ``image_run``
    (its default sampler, steps, guidance and seed from the ``image:`` section), cached."""

    image_run = Path(image_run)
    meta = read_image_config(image_run)
    config = load_settings("image")
    gen = {k: config[k] for k in GENERATE_KEYS}
    if seed is not None:
        gen["sample_seed"] = seed
    descriptor = {
        "run": str(image_run.resolve()),
        "weights": _file_stamp(image_run / WEIGHTS_FILE),
        **{
            k: gen[k]
            for k in ("sample_steps", "guidance_scale", "sampler", "sample_seed", "sdedit_strength", "sdedit_blend")
        },
    }

    def compute(batch_users: list[str]) -> np.ndarray:
        tokens = PreferenceTokens.load(meta["tokens_folder"], dataset=dataset)
        vocab = PreferenceVocabulary(tokens)
        model, _ = load_image_generator(image_run, vocab, dataset=dataset)
        settings = run_image_settings(meta, {k: v for k, v in config.items() if k != "num_threads"})
        with torch_threads(num_threads):
            codec, _ = run_codec(model, meta, settings)
            images = generate_posters(
                model,
                codec,
                user_positions(vocab, batch_users),
                context=user_context(model, tokens, batch_users),
                **sampling_arguments(gen),
                progress=progress,
            )
            return image_features(load_default_encoder("image"), [tensor_to_pil(x) for x in images])

    logger.info("pre-RL posters of %d users from %s (cached)", len(users), image_run)
    return cached_features("poster", descriptor, users, compute)


def pre_rl_text_features(
    dataset: str,
    text_run: Path,
    users: Sequence[str],
    num_threads: int | None = 1,
    progress: bool = True,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """MiniLM features of one text per user from the text generator ``text_run`` (the
    ``text.generate`` settings and ``text.seed``), cached."""

    text_run = Path(text_run)
    cfg = load_settings(
        "text", {"num_threads": num_threads, "progress": progress, **({"seed": seed} if seed is not None else {})}
    )
    descriptor = {
        "run": str(text_run.resolve()),
        "adapter": _file_stamp(text_run / "dppmg" / META),
        "seed": cfg["seed"],
        **cfg["generate"],
    }

    def compute(batch_users: list[str]) -> np.ndarray:
        with torch_threads(num_threads):
            tokens = load_tokens(dataset, None, cfg, run_settings(text_run).get("tokens"))
            vocabulary = PreferenceVocabulary(tokens)
            lm = load_text_generator(text_run, vocabulary, cfg)
            texts = generate_texts(
                lm.model,
                lm.tokenizer,
                TokenConditioner(lm, vocabulary),
                batch_users,
                **generation_options(cfg, lm.token_ids),
            )
            return load_default_encoder("text").encode([t or " " for t in texts], progress=False)

    logger.info("pre-RL texts of %d users from %s (cached)", len(users), text_run)
    return cached_features("text", descriptor, users, compute)
