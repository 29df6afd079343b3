r"""FREEDOM (Zhou & Shen, ACM MM 2023): freeze the item-item graph, denoise the user-item graph.

* Item-item graph: per modality, every item's ``knn_k`` cosine nearest neighbours of its raw
  features, normalised and fused (``mm_image_weight`` for the image graph); built once at init
  and never changed (``recbole_dppmg.model.freedom_graphs``).
* User-item graph: while training, a fresh subgraph each epoch keeps ``1 - dropout`` of the
  edges, drawn with probability proportional to ``1/sqrt(d_u d_i)`` and re-normalised; at
  evaluation the full graph.
* Representations: LightGCN over the user-item graph of the ID embeddings; items add
  ``S^n_mm_layers`` times their ID embeddings (``S`` the frozen graph). Scores are dot products.
* Loss: BPR on those, plus ``modal_weight`` times a BPR of the user against each modality's
  linear projection of the (fine-tuned) raw features, plus ``reg_weight`` L2 on the batch's
  layer-0 embeddings.

The multimodal graph baseline of issue 22; MMRec (github enoche/MMRec) is the reference.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.loss import BPRLoss, EmbLoss
from recbole.utils import InputType
from torch import nn
from torch_geometric.utils import spmm

from recbole_dppmg.model.config_check import check_config
from recbole_dppmg.model.freedom_graphs import (
    bipartite_adjacency,
    fused_item_graph,
    knn_edges,
    prunable_edges,
    pruned_adjacency,
)
from recbole_dppmg.model.graph import LightGCNPropagation
from recbole_dppmg.model.modal_features import load_modal_features, parse_modalities

IMAGE_MODALITY = "image"  # the modality whose kNN graph gets mm_image_weight


def graph_weights(modalities: list[str], image_weight: float) -> dict[str, float]:
    """Fusion weight of each modality's kNN graph: ``image_weight`` for the image graph, the rest
    shared equally by the others (MMRec: ``w`` image, ``1 - w`` text); one modality: 1."""
    if len(modalities) == 1:
        return {modalities[0]: 1.0}
    others = [m for m in modalities if m != IMAGE_MODALITY]
    if len(others) == len(modalities):
        return {m: 1.0 / len(modalities) for m in modalities}
    return {m: image_weight if m == IMAGE_MODALITY else (1.0 - image_weight) / len(others) for m in modalities}


class FREEDOM(GeneralRecommender):
    """LightGCN on a degree-pruned user-item graph plus a frozen multimodal item-item graph."""

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_config(config, "FREEDOM")  # every key below is set (properties/model/FREEDOM.yaml) and valid
        self.modalities = parse_modalities(config)
        features = load_modal_features(dataset, config)
        self.embedding_size = config["embedding_size"]
        self.knn_k = config["knn_k"]
        self.mm_image_weight = float(config["mm_image_weight"])
        self.n_mm_layers = config["n_mm_layers"]
        self.dropout = float(config["dropout"])
        self.modal_weight = float(config["modal_weight"])
        self.reg_weight = float(config["reg_weight"])

        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_id_embedding = nn.Embedding(self.n_items, self.embedding_size)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_id_embedding.weight)
        tune = bool(config["tune_features"])
        self.features = nn.ParameterDict(
            {m: nn.Parameter(features[m].features.clone(), requires_grad=tune) for m in self.modalities}
        )
        self.projections = nn.ModuleDict(
            {m: nn.Linear(features[m].width, self.embedding_size) for m in self.modalities}
        )
        for m in self.modalities:
            self.register_buffer(f"present_{m}", features[m].present, persistent=False)

        # The frozen item-item graph: a function of the raw features, built once, never trained.
        graphs = {m: knn_edges(features[m].features, features[m].present, self.knn_k) for m in self.modalities}
        present = {m: features[m].present for m in self.modalities}
        weights = graph_weights(self.modalities, self.mm_image_weight)
        self.register_buffer("item_graph", fused_item_graph(graphs, weights, present, self.n_items), persistent=False)

        # The user-item graph: its edges, their keep weights, and the full normalised adjacency.
        inter = dataset.inter_matrix(form="coo")
        users, items, keep = prunable_edges(inter, self.n_users, self.n_items)
        self.register_buffer("edge_users", users, persistent=False)
        self.register_buffer("edge_items", items, persistent=False)
        self.register_buffer("edge_keep_weights", keep, persistent=False)
        full = bipartite_adjacency(users, items, self.n_users, self.n_items)
        self.register_buffer("full_adj", full, persistent=False)
        self._pruned_adj: torch.Tensor | None = None  # this epoch's denoised graph, drawn lazily
        self.propagation = LightGCNPropagation(config["n_ui_layers"])
        self.bpr_loss = BPRLoss()
        self.emb_loss = EmbLoss()
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # full-graph vectors, for evaluation

    def prune_graph(self) -> torch.Tensor:
        """A denoised user-item adjacency: ``1 - dropout`` of the edges, degree-sensitively drawn."""
        if self.dropout <= 0.0:
            return self.full_adj
        return pruned_adjacency(
            self.edge_users, self.edge_items, self.edge_keep_weights, self.dropout, self.n_users, self.n_items
        )

    def forward(self, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item vectors: LightGCN over ``adj`` plus the item-item convolution."""
        ego = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight])
        users, items = torch.split(self.propagation(ego, adj), [self.n_users, self.n_items])
        h = self.item_id_embedding.weight
        for _ in range(self.n_mm_layers):
            h = spmm(self.item_graph, h)
        return users, items + h

    def _modal_bpr(self, user_vectors, pos, neg) -> torch.Tensor:
        """BPR of the users against each modality's projected features; pairs where the positive
        or the negative lacks the modality (a missing poster) say nothing and are left out."""
        total = user_vectors.new_zeros(())
        for m in self.modalities:
            present = getattr(self, f"present_{m}")
            both = present[pos] & present[neg]
            if not both.any():
                continue
            u, p, n = user_vectors[both], pos[both], neg[both]
            project = self.projections[m]
            pos_score = (u * project(self.features[m][p])).sum(1)
            neg_score = (u * project(self.features[m][n])).sum(1)
            total = total + self.bpr_loss(pos_score, neg_score)
        return total

    def calculate_loss(self, interaction):
        self._cache = None
        user = interaction[self.USER_ID]
        pos = interaction[self.ITEM_ID]
        neg = interaction[self.NEG_ITEM_ID]
        if self.training:
            if self._pruned_adj is None:
                self._pruned_adj = self.prune_graph()
            adj = self._pruned_adj
        else:
            adj = self.full_adj  # a loss measured outside training: the deterministic full graph
        users, items = self.forward(adj)
        u = users[user]
        loss = self.bpr_loss((u * items[pos]).sum(1), (u * items[neg]).sum(1))
        if self.modal_weight > 0:
            loss = loss + self.modal_weight * self._modal_bpr(u, pos, neg)
        if self.reg_weight > 0:
            reg = self.emb_loss(self.user_embedding(user), self.item_id_embedding(pos), self.item_id_embedding(neg))
            loss = loss + self.reg_weight * reg
        return loss

    def _vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.forward(self.full_adj)
        return self._cache

    def predict(self, interaction):
        users, items = self._vectors()
        return (users[interaction[self.USER_ID]] * items[interaction[self.ITEM_ID]]).sum(1)

    def full_sort_predict(self, interaction):
        users, items = self._vectors()
        return (users[interaction[self.USER_ID]] @ items.t()).view(-1)

    def train(self, mode: bool = True):
        """RecBole's trainer calls ``train()`` at the start of every epoch: the next training step
        draws that epoch's pruned graph."""
        if mode:
            self._cache = None
            self._pruned_adj = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
