"""The pretrained path: a local diffusers Stable Diffusion pipeline (``image.backbone`` = its folder)
steered by preference tokens added to its tokenizer and text encoder, textual-inversion style.

The new token embeddings start as a projection of the stage-1 codebook vectors, scaled to the
norm of the encoder's own embeddings; they live in one tensor of their own beside the encoder's
frozen table (:class:`PreferenceTokenEmbedding`), so only they train and the base vocabulary stays
bit-identical; optionally LoRA adapters on the UNet's attention train with them. Training pairs
are the default model's: a user's tokens -> the poster of an item the user rated highly, the
posters' VAE latents cached once like the TAEF2 ones.

:class:`SDPosterModel` gives the pipeline the interface of ``PosterDiffusion`` (token positions
in, the text encoder's states of the user's prompt out; ``GuidedSampling``), so generation, image
RL (DDPO on the new rows, UNet and text encoder frozen) and the report run on it unchanged. A user
without tokens gets the prompt with no tokens in it; guidance contrasts with the empty prompt.
There is no poster context: ``image.conditioning=retrieval`` (the default) does not apply and the run
records ``tokens``; ``history`` is refused (``settings.check_backbone``); sampling starts from noise.

An SD run is an ordinary ``ImageGen-*`` folder: ``model.safetensors`` holds the new rows
(``embeddings``, + ``lora.*``), ``run.json`` has format ``SD_FORMAT`` and the pipeline's folder,
which is read again whenever the run is loaded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from recbole_dppmg.data.featurize import torch_threads
from recbole_dppmg.devices import resolve_device
from recbole_dppmg.errors import CheckpointError, ConfigError
from recbole_dppmg.generation.common.settings import load_settings, sd_backbone
from recbole_dppmg.generation.common.user_split import split_seed
from recbole_dppmg.generation.common.vocabulary import (
    CodebookProjection,
    PreferenceVocabulary,
)
from recbole_dppmg.generation.image.checkpoint import (
    SD_FORMAT,
    refuse_existing_run,
    save_checkpoint,
    vocabulary_record,
)
from recbole_dppmg.generation.image.data import (
    cached_latents,
    training_images,
    training_pairs,
)
from recbole_dppmg.generation.image.model import GuidedSampling
from recbole_dppmg.paths import SAVED_DIR
from recbole_dppmg.runs import IMAGE_GEN, new_run_folder
from recbole_dppmg.tokens import PreferenceTokens

logger = logging.getLogger(__name__)

# the image.sd keys that shape the model a run records (the rest are how it trained)
SD_MODEL_KEYS = ("prompt_template", "height", "width", "lora_rank")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def load_sd_pipeline(path: str | Path, device: str = "cpu"):
    """A Stable Diffusion pipeline from a local folder (no hub access)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not load as a Stable Diffusion pipeline: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device, key="image.sd.device"))


def sd_model_config(settings) -> dict:
    """What a run on ``settings`` (an SD ``image`` section) records as its model."""
    return {
        "backbone": str(sd_backbone(settings).resolve()),
        "conditioning": "tokens",
        **{k: settings["sd"][k] for k in SD_MODEL_KEYS},
    }


def sd_train_config(settings) -> dict:
    """What a run on ``settings`` records as how it trained (``train``: the shared user split's keys too)."""
    return {k: v for k, v in settings["sd"].items() if k not in SD_MODEL_KEYS}


def run_sd_settings(meta: dict, local: dict):
    """The ``image`` settings of an SD run, this machine's ``local`` keys (threads, poster folder) over them."""
    sd = {**meta["train"], **{k: meta["model"][k] for k in SD_MODEL_KEYS}}
    if local.get("poster_dir"):
        sd["poster_dir"] = local["poster_dir"]
    return load_settings(
        "image", {**local, "backbone": meta["model"]["backbone"], "poster_dir": sd["poster_dir"], "sd": sd}
    )


def initial_rows(table: torch.Tensor, vocab: PreferenceVocabulary, seed: int) -> torch.Tensor:
    """The new rows before training: the codebook vectors through a seeded projection, scaled to
    the mean norm of the encoder's rows ``table``."""
    table = table.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = CodebookProjection(vocab.vectors, table.shape[1], target_scale=table.norm(dim=1).mean().item())
        return projection().detach()


class PreferenceTokenEmbedding(nn.Module):
    """The text encoder's token embedding with the preference tokens' rows as a tensor of their
    own: ids below ``first`` read the frozen base table, the others ``rows``."""

    def __init__(self, base: nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.base, self.first = base.requires_grad_(False), first
        self.rows = nn.Parameter(rows.detach().clone().to(base.weight))

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, as ``get_input_embeddings().weight`` reads it."""
        return torch.cat([self.base.weight[: self.first], self.rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        base = self.base(ids.masked_fill(new, 0))
        return torch.where(new[..., None], self.rows[(ids - self.first).clamp_min(0)], base)


class SDCodec(nn.Module):
    """The pipeline's VAE as a poster codec (images in [-1, 1]; raw latents, the posterior mean)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


class SDPosterModel(GuidedSampling, nn.Module):
    """A Stable Diffusion pipeline with the preference tokens, in the interface of ``PosterDiffusion``."""

    conditioning, context, routed = "tokens", None, None

    def __init__(self, pipe, vocab: PreferenceVocabulary, config: dict, rows: torch.Tensor):
        """``config``: :func:`sd_model_config`; ``rows``: the new tokens' embeddings. The pipeline's
        tokenizer and text encoder get the tokens (use a pipeline once)."""
        super().__init__()
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        first, base = len(tokenizer), encoder.get_input_embeddings()
        if base.num_embeddings < first:
            raise CheckpointError(
                f"{config['backbone']}: the text encoder has fewer rows than its tokenizer has tokens"
            )
        if tokenizer.add_tokens(list(vocab.strings)) != len(vocab):
            raise ConfigError(f"some preference tokens already exist in the tokenizer of {config['backbone']}")
        self.tokens = PreferenceTokenEmbedding(base, first, rows)
        encoder.set_input_embeddings(self.tokens)
        self.text_encoder, self.unet, self.codec = encoder, pipe.unet, SDCodec(pipe.vae)
        self.tokenizer, self.strings, self.config = tokenizer, list(vocab.strings), dict(config)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.n_slots = len(vocab.slot_modalities())
        self.latent_channels = pipe.unet.config.in_channels
        factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if config["height"] % factor or config["width"] % factor:
            raise ConfigError(
                f"image.sd.height/width must be multiples of {factor} for {config['backbone']}, "
                f"got {config['height']}x{config['width']}"
            )
        self.latent_size = (config["height"] // pipe.vae_scale_factor, config["width"] // pipe.vae_scale_factor)
        if config["lora_rank"]:
            from peft import LoraConfig

            rank = config["lora_rank"]
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
        self.requires_grad_(False)
        self._check_prompt()

    def _check_prompt(self) -> None:
        """Every token of a user must reach the text encoder as one id, inside its positions."""
        limit = self.tokenizer.model_max_length
        prompt = self.prompts(torch.arange(self.n_slots)[None])
        ids = self.tokenizer(prompt, truncation=True, max_length=limit).input_ids[0]
        kept = sum(i >= self.tokens.first for i in ids)
        if kept != self.n_slots:
            raise ConfigError(
                f"image.sd.prompt_template {self.config['prompt_template']!r} keeps {kept} of a user's "
                f"{self.n_slots} preference tokens within the text encoder's {limit} positions; shorten it"
            )

    # ------------------------------------------------------------------ conditioning
    def prompts(self, positions: torch.Tensor, drop: torch.Tensor | None = None) -> list[str]:
        """The prompt of each row of token positions (-1 = none: the prompt without tokens); a
        ``drop`` row gets the empty prompt."""
        out = []
        for k, row in enumerate(positions.tolist()):
            words = " ".join(self.strings[p] for p in row if p >= 0)
            out.append(
                "" if drop is not None and bool(drop[k]) else self.config["prompt_template"].format(tokens=words)
            )
        return out

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states ``[B, L, dim]`` of ``prompts`` (the UNet's conditioning)."""
        tokenizer = self.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.tokens.rows.device))[0]

    def condition(
        self, positions: torch.Tensor, drop: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if positions.shape[1] != self.n_slots:
            raise ConfigError(f"expected {self.n_slots} preference tokens per user, got {positions.shape[1]}")
        return self.encode(self.prompts(positions, drop))

    def unconditional(self, batch: int) -> torch.Tensor:
        """The empty prompt's states (what guidance contrasts with)."""
        with torch.no_grad():
            states = self.encode([""])
        return states.expand(batch, *states.shape[1:])

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=cond).sample

    def train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    # ------------------------------------------------------------------ latents
    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.codec.vae.config
        return (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.codec.vae.config
        return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)

    # ------------------------------------------------------------------ trainable tensors
    def token_parameters(self, train_null: bool = False) -> dict[str, nn.Parameter]:
        """The new token rows (what image RL moves; the LoRA adapters, if any, stay as trained)."""
        if train_null:
            raise ConfigError(
                "rl.image.train_null: a Stable Diffusion backbone's null conditioning is the empty prompt"
            )
        return {"token_rows": self.tokens.rows}

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.unet.named_parameters() if "lora_" in name]

    def weights(self) -> dict[str, torch.Tensor]:
        """What a run folder saves: the new rows (+ the LoRA weights), not the pipeline."""
        out = {"embeddings": self.tokens.rows.detach()}
        if self.config["lora_rank"]:
            from peft import get_peft_model_state_dict

            out.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.unet).items()})
        return out


def load_sd_generator(meta: dict, vocab: PreferenceVocabulary, weights: dict | None = None) -> SDPosterModel:
    """The model of an SD run (on the CPU) from its record and saved ``weights``; without them the
    run's starting point (the seeded initial rows: the untrained baseline of the evaluation)."""
    pipe = load_sd_pipeline(meta["model"]["backbone"])
    if weights is None:
        table = pipe.text_encoder.get_input_embeddings().weight[: len(pipe.tokenizer)]
        weights = {"embeddings": initial_rows(table, vocab, meta["train"]["seed"])}
    model = SDPosterModel(pipe, vocab, meta["model"], weights["embeddings"])
    lora = {k[len("lora.") :]: v for k, v in weights.items() if k.startswith("lora.")}
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.unet, lora)
    return model.requires_grad_(False)


def _codec_id(folder: Path) -> str:
    """The latent cache key of a pipeline's VAE: its folder and the sizes of its files."""
    vae = folder.resolve() / "vae"
    return f"sd-vae:{vae}:{sum(p.stat().st_size for p in vae.glob('*') if p.is_file())}"


def train_sd_tokens(
    dataset: str,
    tokens_folder: str | Path,
    config: dict | None = None,
    out_dir: str | Path | None = None,
    posters: dict[str, Path] | None = None,
    pipe=None,
) -> Path:
    """Textual-inversion training of the preference tokens on the pipeline ``image.backbone`` names
    (``config``: ``image`` overrides; ``image.sd`` holds the training keys), optionally + UNet LoRA;
    returns the ``ImageGen-*`` folder, written only once training ended. ``posters`` / ``pipe``
    replace the dataset's posters and the loaded pipeline (tests)."""

    settings = load_settings("image", config)
    backbone = sd_backbone(settings)
    if backbone is None:
        raise ConfigError("train_sd_tokens needs image.backbone = a Stable Diffusion folder, not latent")
    s = settings["sd"]
    if settings["conditioning"] == "retrieval":
        logger.info("image.conditioning=retrieval does not apply to a Stable Diffusion backbone: the tokens alone")
    posters, liked = training_images(dataset, s["poster_dir"], s["min_rating"], posters)
    tokens = PreferenceTokens.load(tokens_folder, dataset=dataset)
    vocab = PreferenceVocabulary(tokens)
    if out_dir is not None:
        refuse_existing_run(Path(out_dir))
    device = resolve_device(s["device"], key="image.sd.device")
    pipe = pipe or load_sd_pipeline(backbone)
    model_cfg = sd_model_config(settings)
    table = pipe.text_encoder.get_input_embeddings().weight[: len(pipe.tokenizer)]
    model = SDPosterModel(pipe, vocab, model_cfg, initial_rows(table, vocab, s["seed"])).to(device).eval()
    codec_id = _codec_id(backbone)
    with torch_threads(settings["num_threads"]):
        item_ids, latents = cached_latents(
            posters, model.codec, s["height"], s["width"], codec_id, cache_dir=settings["cache_dir"]
        )
        split = training_pairs(tokens, item_ids, liked, s["valid_users"], s["test_users"], split_seed(s))
        row = {item: k for k, item in enumerate(item_ids)}
        positions = torch.tensor([vocab.ids_for(u) for u, _ in split.pairs], dtype=torch.long)
        targets = torch.tensor([row[i] for _, i in split.pairs])
        params = [model.tokens.rows.requires_grad_(True)] + [p.requires_grad_(True) for p in model.lora_parameters()]
        optimizer = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=0.0)
        scheduler = model.train_scheduler()
        rng = torch.Generator().manual_seed(s["seed"])
        started, step, running = time.perf_counter(), 0, None
        bar = tqdm(total=s["max_steps"], desc="SD preference tokens", unit="step", disable=not s["progress"])
        while step < s["max_steps"] and time.perf_counter() - started < s["max_minutes"] * 60:
            batch = torch.randint(len(targets), (s["batch_size"],), generator=rng)
            x0 = model.normalise(latents[targets[batch]].to(device))
            noise = torch.randn(x0.shape, generator=rng).to(device)
            t = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=rng).to(device)
            out = model(scheduler.add_noise(x0, noise, t), t, model.condition(positions[batch]))
            wanted = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
            loss = torch.nn.functional.mse_loss(out.float(), wanted.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
        bar.close()
    model.requires_grad_(False)
    seconds = time.perf_counter() - started
    folder = Path(out_dir) if out_dir is not None else new_run_folder(SAVED_DIR, dataset, IMAGE_GEN.name)
    meta = {
        "format": SD_FORMAT,
        "dataset": dataset,
        "tokens_folder": str(tokens_folder),
        "model": model_cfg,
        "latent_channels": model.latent_channels,
        "n_slots": model.n_slots,
        "vocabulary": vocabulary_record(vocab),
        "codec": codec_id,
        "train": sd_train_config(settings),
        "pairs": len(split.pairs),
        "train_users": len(split.train_users),
        "heldout_users": split.heldout_users,
        "test_users": split.test_users,
        "trained_steps": step,
        "train_seconds": round(seconds, 1),
        "final_loss": running,
    }
    save_checkpoint(folder, model, meta)
    logger.info("Stable Diffusion preference tokens: %d steps, %.0f s, saved in %s", step, seconds, folder)
    return folder
