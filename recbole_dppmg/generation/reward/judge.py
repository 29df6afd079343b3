"""The reward of generated content: the stage-1 model as the judge (DESIGN "Reward and RL").

- Personalization: a generated text / poster is encoded like an item of its modality (MiniLM /
  EfficientNet features), mapped into stage 1's layer-0 item space of that modality
  (``PreferenceTokens.embed_item_features``) and scored against the user's modal preference
  vector. The reward is the percentile of that score among the scores of the catalogue items
  (those that have the modality) for the same user, the catalogue embedded the same way
  (content only, no per-item residual, no propagation), so like is compared with like:
  0.9 = "would rank in this user's top 10%". The user vector is by default the decoded
  preference tokens (``reward.user_vector: quantized``): the generators see only the tokens,
  and stage 1 ranks items with them (``eval_quantized``).
- Consistency: text and poster each induce a distribution over the catalogue items that have
  both modalities, each in its own modality's space (by default stage 1's layer-0 item space
  of that modality, ``reward.consistency_space``): cosine similarity to the items (vectors
  centred on the catalogue mean), z-scored per query, softmax at ``consistency_temperature``;
  the agreement is 1 - Jensen-Shannon divergence (base 2) or the Bhattacharyya coefficient.
  Both lie in [0, 1].
- CLIP (optional, ``reward.clip_path``): max(cos, 0) between a CLIP model's embeddings of the
  generated text and poster.

``total`` is the weighted mean of the components that were computed (weights in the
``reward:`` section of ``properties/generation.yaml``), so it stays in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import rel_entr, softmax

from recbole_dppmg.data.atomic import read_item_table
from recbole_dppmg.errors import CheckpointError, ConfigError, DataError
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.paths import dataset_root


@dataclass
class _Catalogue:
    """One modality's catalogue: the items that have it, their raw features and their layer-0
    embedding (content only), as the judge compares generated content with them."""

    item_ids: list[str]
    features: np.ndarray  # [N, width] raw encoder features
    embedded: np.ndarray  # [N, dim] embed_item_features(features)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


class PreferenceJudge:
    """Scores generated content for a user with the stage-1 model of a token export (numpy only).

    >>> judge = PreferenceJudge.for_dataset("ml-100k-mm", PreferenceTokens.load(folder))
    >>> judge.reward(["196"], text_features=miniLM_vectors, image_features=efficientnet_vectors)
    """

    def __init__(self, tokens, catalogues: dict[str, _Catalogue], config: dict):
        self.tokens, self.config = tokens, config
        self.catalogues = catalogues
        self.modalities = [m for m in tokens.modalities if m in catalogues]
        # consistency: items that have both text and image, in one order
        self.joint: dict[str, np.ndarray] = {}
        if {"text", "image"} <= set(catalogues):
            image_rows = {i: k for k, i in enumerate(catalogues["image"].item_ids)}
            pairs = [(k, image_rows[i]) for k, i in enumerate(catalogues["text"].item_ids) if i in image_rows]
            if not pairs:
                raise DataError("no catalogue item has both a text and an image feature; consistency is undefined")
            rows = np.array(pairs)
            for m, column in (("text", 0), ("image", 1)):
                space = self._space(m, catalogues[m].features[rows[:, column]], catalogues[m].embedded[rows[:, column]])
                self.joint[m] = space
            self.joint_items = [catalogues["text"].item_ids[k] for k in rows[:, 0]]
        self._clip = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_export(
        cls, tokens, item_features: dict[str, np.ndarray], item_ids: list[str], config: dict | None = None
    ) -> "PreferenceJudge":
        """``item_features[m]``: raw features ``[len(item_ids), width]`` of the catalogue, rows in
        ``item_ids`` order; an all-zero (or non-finite) row = the item lacks that modality.
        Items unknown to the export are ignored."""
        config = load_settings("reward", config)
        known = set(tokens.item_ids[1:])
        item_ids = [str(i) for i in item_ids]
        catalogues = {}
        for m in tokens.modalities:
            if m not in item_features or m not in tokens.manifest.get("item_encoders", {}):
                continue
            features = np.asarray(item_features[m], dtype=np.float32)
            if features.ndim != 2 or len(features) != len(item_ids):
                raise DataError(f"{m} catalogue features must be [{len(item_ids)}, width], got {list(features.shape)}")
            keep = [
                k
                for k, i in enumerate(item_ids)
                if i in known and np.isfinite(features[k]).all() and np.abs(features[k]).sum() > 0
            ]
            if not keep:
                raise DataError(f"no catalogue item of the token export has a {m} feature")
            kept = features[keep]
            catalogues[m] = _Catalogue([item_ids[k] for k in keep], kept, tokens.embed_item_features(kept, m))
        if not catalogues:
            raise DataError(
                f"none of the token export's modalities ({', '.join(tokens.modalities)}) has catalogue features"
            )
        return cls(tokens, catalogues, config)

    @classmethod
    def for_dataset(
        cls, dataset: str, tokens, config: dict | None = None, dataset_dir: str | Path | None = None
    ) -> "PreferenceJudge":
        """The judge over the prepared dataset's catalogue (its ``.item`` features, the field
        names recorded in the export; an item whose ``<m>_mask`` is 0 lacks modality ``m``)."""

        if tokens.manifest.get("dataset") != dataset:
            raise CheckpointError(
                f"token export {tokens.folder} was made for dataset {tokens.manifest.get('dataset')}, not {dataset}"
            )
        path = Path(dataset_dir or dataset_root() / dataset) / f"{dataset}.item"
        if not path.is_file():
            raise DataError(f"{path} is missing; run --stage prepare for dataset {dataset} first")
        table = read_item_table(path, with_features=True)
        item_ids = [str(i) for i in table.index]
        features = {}
        for m, info in tokens.manifest.get("item_encoders", {}).items():
            field = info["field"]
            if field not in table.columns:
                raise DataError(f"{path} has no {field} column (the token export's {m} feature)")
            rows = [
                np.asarray(v, dtype=np.float32)
                if isinstance(v, np.ndarray) and len(v) == info["width"]
                else np.zeros(info["width"], np.float32)
                for v in table[field]
            ]
            matrix = np.stack(rows)
            mask = field[: -len("_feat")] + "_mask" if field.endswith("_feat") else None
            if mask and mask in table.columns:
                matrix[~(table[mask].astype(float).to_numpy() > 0)] = 0
            features[m] = matrix
        return cls.from_export(tokens, features, item_ids, config)

    # ------------------------------------------------------------------ personalization
    def user_vectors(self, users: Sequence[str], modality: str) -> np.ndarray:
        """The users' preference vectors ``[N, dim]`` the judge scores against."""
        rows = np.array([self.tokens.user_row(u) for u in users], dtype=np.int64)
        if self.config["user_vector"] == "continuous":
            return np.asarray(self.tokens.user_vectors[modality][rows], dtype=np.float32)
        k = self.tokens.modalities.index(modality)
        return np.asarray(self.tokens.decode(self.tokens.user_codes[rows, k], modality), dtype=np.float32)

    def _catalogue(self, modality: str) -> _Catalogue:
        if modality not in self.catalogues:
            raise DataError(f"the judge has no {modality} catalogue (has {', '.join(self.catalogues)})")
        return self.catalogues[modality]

    def personalization(self, users: Sequence[str], modality: str, features: np.ndarray) -> np.ndarray:
        """``[N]`` percentile in [0, 1] of each row's score for ``users[row]`` among that user's
        scores of the catalogue items (ties, up to float rounding, count half)."""
        catalogue = self._catalogue(modality)
        features = self._check_rows(users, features, modality)
        content = self.tokens.embed_item_features(features, modality)
        user = self.user_vectors(users, modality)
        score = (content * user).sum(1, keepdims=True)
        items = user @ catalogue.embedded.T  # [N, n_items]
        tie = np.isclose(items, score, rtol=1e-5, atol=1e-6)
        below = ((items < score) & ~tie).sum(1) + 0.5 * tie.sum(1)
        return (below / items.shape[1]).astype(np.float64)

    # ------------------------------------------------------------------ consistency
    def _space(self, modality: str, features: np.ndarray, embedded: np.ndarray | None = None) -> np.ndarray:
        """Unit vectors in the consistency space, centred on the modality's catalogue mean:
        stage 1's layer-0 item vectors, or the encoder features themselves."""
        catalogue = self.catalogues[modality]
        if self.config["consistency_space"] == "stage1":
            vectors = embedded if embedded is not None else self.tokens.embed_item_features(features, modality)
            return _unit(vectors - catalogue.embedded.mean(0))
        return _unit(features - catalogue.features.mean(0))

    def item_distribution(self, modality: str, features: np.ndarray) -> np.ndarray:
        """``[N, n_joint_items]``: softmax over z-scored similarities to the joint catalogue."""
        if not self.joint:
            raise DataError("consistency needs text and image catalogues")
        features = np.atleast_2d(np.asarray(features, dtype=np.float32))
        similarity = self._space(modality, features) @ self.joint[modality].T
        z = (similarity - similarity.mean(1, keepdims=True)) / np.clip(similarity.std(1, keepdims=True), 1e-12, None)
        return softmax(z.astype(np.float64) / float(self.config["consistency_temperature"]), axis=1)

    def consistency(self, text_features: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        """``[N]`` in [0, 1]: agreement of the item distributions of row ``k``'s text and image."""
        text_features = np.atleast_2d(np.asarray(text_features, dtype=np.float32))
        image_features = np.atleast_2d(np.asarray(image_features, dtype=np.float32))
        if len(text_features) != len(image_features):
            raise DataError(
                f"consistency needs one image per text, got {len(text_features)} texts and {len(image_features)} images"
            )
        p, q = self.item_distribution("text", text_features), self.item_distribution("image", image_features)
        if self.config["consistency_measure"] == "bhattacharyya":
            return np.clip(np.sqrt(p * q).sum(1), 0.0, 1.0)
        middle = (p + q) / 2
        divergence = (rel_entr(p, middle).sum(1) + rel_entr(q, middle).sum(1)) / (2 * np.log(2))
        return np.clip(1.0 - divergence, 0.0, 1.0)

    # ------------------------------------------------------------------ CLIP
    def clip_scorer(self) -> "ClipScorer | None":
        if self._clip is None and self.config.get("clip_path"):
            self._clip = ClipScorer(self.config["clip_path"])
        return self._clip

    # ------------------------------------------------------------------ all together
    def reward(
        self,
        users: Sequence[str],
        text_features: np.ndarray | None = None,
        image_features: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
        images: Sequence | None = None,
        partner: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-row components and their weighted mean ``total`` (weights from ``reward:``).

        Keys: ``text_personalization`` / ``image_personalization`` (when those features are
        given), ``consistency`` (both given), ``clip`` (``clip_path`` set and raw ``texts`` and
        PIL ``images`` given), ``total``. ``partner`` (RL) names the modality whose content is
        fixed per user (the other generator's pre-RL output); with ``reward.relative`` the
        generated modality's personalization and the consistency are then relative to the other
        users of the batch (:meth:`relative_personalization`, :meth:`relative_consistency`) and the
        partner's own personalization is left out, so the batch mean of a constant content's
        ``total`` is exactly 0."""
        users = [str(u) for u in users]
        relative = bool(self.config.get("relative")) and partner is not None
        features = {"text": text_features, "image": image_features}
        out: dict[str, np.ndarray] = {}
        for m, rows in features.items():
            if rows is None:
                continue
            if relative and m == partner:
                continue  # fixed per user, not what RL generates: it would make a constant content's reward non-zero
            out[f"{m}_personalization"] = (
                self.relative_personalization(users, m, rows) if relative else self.personalization(users, m, rows)
            )
        if text_features is not None and image_features is not None:
            out["consistency"] = (
                self.relative_consistency(users, text_features, image_features, partner)
                if relative
                else self.consistency(text_features, image_features)
            )
        scorer = self.clip_scorer()
        if scorer is not None and texts is not None and images is not None:
            out["clip"] = scorer.score(texts, images)
        if not out:
            raise DataError("the reward needs text features, image features or both")
        weights = {name: float(self.config[f"{name}_weight"]) for name in out}
        total_weight = sum(weights.values())
        if total_weight <= 0:
            raise ConfigError(f"all weights of the computed reward components ({', '.join(out)}) are 0")
        out["total"] = sum(weights[name] * values for name, values in out.items()) / total_weight
        return out

    # ------------------------------------------------------------------ relative (RL)
    @staticmethod
    def _batch_users(users: Sequence[str]) -> tuple[list[str], np.ndarray]:
        distinct = list(dict.fromkeys(users))
        if len(distinct) < 2:
            raise DataError("a relative reward needs at least two users in the batch")
        column = {u: k for k, u in enumerate(distinct)}
        return distinct, np.array([column[u] for u in users])

    def relative_personalization(self, users: Sequence[str], modality: str, features) -> np.ndarray:
        """Row ``i``'s percentile for its own user minus its mean percentile for the batch's other
        users: content every user likes alike earns 0, and the batch mean of a constant content's
        reward is exactly 0 (popularity is not rewarded)."""
        distinct, own = self._batch_users(users)
        features = self._check_rows(users, features, modality)
        n, k = len(users), len(distinct)
        judged = self.personalization(distinct * n, modality, np.repeat(features, k, axis=0)).reshape(n, k)
        mine = judged[np.arange(n), own]
        return mine - (judged.sum(1) - mine) / (k - 1)

    def relative_consistency(self, users: Sequence[str], text_features, image_features, partner: str) -> np.ndarray:
        """Row ``i``'s consistency with its own user's ``partner`` content minus its mean with the
        other users' partner content (one row per user: the partner content is fixed per user)."""
        distinct, own = self._batch_users(users)
        text = self._check_rows(users, text_features, "text")
        image = self._check_rows(users, image_features, "image")
        fixed = image if partner == "image" else text
        first = {u: i for i, u in reversed(list(enumerate(users)))}
        per_user = fixed[[first[u] for u in distinct]]  # [k, width]
        n, k = len(users), len(distinct)
        generated = text if partner == "image" else image
        repeated = np.repeat(generated, k, axis=0)
        others = np.tile(per_user, (n, 1))
        pairs = (repeated, others) if partner == "image" else (others, repeated)
        table = self.consistency(*pairs).reshape(n, k)
        mine = table[np.arange(n), own]
        return mine - (table.sum(1) - mine) / (k - 1)

    @staticmethod
    def _check_rows(users: Sequence[str], features, modality: str) -> np.ndarray:
        features = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if len(features) != len(users):
            raise DataError(
                f"{modality} personalization needs one feature row per user, got {len(features)} rows for {len(users)} "
                "users"
            )
        return features


class ClipScorer:
    """Image-text agreement under a local Hugging Face CLIP model: max(cos, 0) per pair."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"reward.clip_path {path} is not a Hugging Face CLIP folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(str(path)).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"reward.clip_path {path}: {str(error).splitlines()[0]}") from None
        self.device = device

    def score(self, texts: Sequence[str], images: Sequence) -> np.ndarray:
        import torch

        if len(texts) != len(images):
            raise DataError(f"CLIP scores pairs: got {len(texts)} texts and {len(images)} images")
        inputs = self.processor(
            text=[t or " " for t in texts],
            images=[i.convert("RGB") for i in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
        )
        with torch.no_grad():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        cos = torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds, dim=-1)
        return cos.clamp_min(0).double().cpu().numpy()
