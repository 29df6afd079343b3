r"""VBPR (He & McAuley, AAAI 2016) with text and image content, RecBole-style.

``score(u, i) = beta_i + <gamma_u, gamma_i> + <theta_u, E f_i> + <beta', f_i>`` where ``f_i``
concatenates the item's (normalised) feature vectors of the configured modalities (zeros for a
missing modality). The multimodal baseline that DPPMG is compared with under the same protocol.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.init import xavier_normal_initialization
from recbole.model.loss import BPRLoss, EmbLoss
from recbole.utils import InputType
from torch import nn

from recbole_dppmg.model.config_check import check_config
from recbole_dppmg.model.modal_features import load_modal_features, parse_modalities


class VBPR(GeneralRecommender):
    """Visual (here: multimodal) Bayesian Personalized Ranking."""

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_config(config, "VBPR")  # every key below is set (properties/model/VBPR.yaml) and valid
        modalities = parse_modalities(config)
        features = load_modal_features(dataset, config)
        self.modalities = modalities
        self.embedding_size = config["embedding_size"]
        self.content_size = config["content_embedding_size"]
        self.reg_weight = float(config["reg_weight"])

        content = torch.cat([features[m].features for m in modalities], 1)
        self.register_buffer("content", content, persistent=False)  # [n_items, sum of widths]
        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)  # gamma_u
        self.item_embedding = nn.Embedding(self.n_items, self.embedding_size)  # gamma_i
        self.user_content_embedding = nn.Embedding(self.n_users, self.content_size)  # theta_u
        self.content_projection = nn.Linear(content.shape[1], self.content_size, bias=False)  # E
        self.content_bias = nn.Linear(content.shape[1], 1, bias=False)  # beta'
        self.item_bias = nn.Embedding(self.n_items, 1)  # beta_i
        self.bpr_loss = BPRLoss()
        self.emb_loss = EmbLoss()
        self._cache: torch.Tensor | None = None  # all item vectors, for full-sort evaluation
        self.apply(xavier_normal_initialization)
        nn.init.zeros_(self.item_bias.weight)

    def user_vectors(self, user: torch.Tensor) -> torch.Tensor:
        """``[gamma_u, theta_u, 1]``: scores are dot products with ``item_vectors``."""
        ones = torch.ones(user.shape[0], 1, device=user.device)
        return torch.cat([self.user_embedding(user), self.user_content_embedding(user), ones], 1)

    def item_vectors(self, item: torch.Tensor | None = None) -> torch.Tensor:
        """``[gamma_i, E f_i, beta_i + <beta', f_i>]`` for ``item`` (all items when None)."""
        if item is None:
            item = torch.arange(self.n_items, device=self.content.device)
        f = self.content[item]
        bias = self.item_bias(item) + self.content_bias(f)
        return torch.cat([self.item_embedding(item), self.content_projection(f), bias], 1)

    def train(self, mode: bool = True):
        if mode:
            self._cache = None
        return super().train(mode)

    def calculate_loss(self, interaction):
        self._cache = None
        user = interaction[self.USER_ID]
        pos = interaction[self.ITEM_ID]
        neg = interaction[self.NEG_ITEM_ID]
        u = self.user_vectors(user)
        pos_score = (u * self.item_vectors(pos)).sum(1)
        neg_score = (u * self.item_vectors(neg)).sum(1)
        reg = self.emb_loss(
            self.user_embedding(user),
            self.user_content_embedding(user),
            self.item_embedding(pos),
            self.item_embedding(neg),
            self.item_bias(pos),
            self.item_bias(neg),
        )
        return self.bpr_loss(pos_score, neg_score) + self.reg_weight * reg

    def predict(self, interaction):
        user = interaction[self.USER_ID]
        item = interaction[self.ITEM_ID]
        return (self.user_vectors(user) * self.item_vectors(item)).sum(1)

    def full_sort_predict(self, interaction):
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.item_vectors()
        user = interaction[self.USER_ID]
        return (self.user_vectors(user) @ self._cache.t()).view(-1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
