r"""DPPMG stage 1: modal-specific graph recommender with residual-quantized user preferences.

Per modality ``m`` (``text``, ``image``, optionally ``id``): item embedding = ``MLP_m(feature)``
(a learned per-item embedding where the item lacks that modality; a plain item embedding for
``id``), a user embedding, LightGCN propagation on the train graph, giving ``u_m`` and ``i_m``.
With ``item_id_residual`` a feature item's embedding is ``MLP_m(feature) + e_i`` (``e_i`` a free
per-item vector, zero at initialisation), so each feature channel is a LightGCN whose item
embeddings start from, and are tied to, the content. ``feature_dropout`` drops feature entries
(after scaling) in the training loss only.
``u_m`` is quantized by a residual VQ into ``levels`` codes (the user's preference tokens), and
``score(u, i) = sum_m <q(u_m), i_m>`` (``<u_m, i_m>`` when ``eval_quantized`` is False).

Loss = ranking loss on quantized user vectors + ``vq_weight`` * commitment +
``continuous_bpr_weight`` * the same ranking loss on continuous vectors + ``reg_weight`` * L2 on
ego embeddings. The ranking loss (``loss_type``) is BPR with RecBole's sampled negative, or a
softmax cross-entropy of each positive against every item (``softmax``, scores divided by
``softmax_temperature``): all items are negatives, which BPR's single one cannot match, and the
denominator is computed once per distinct user of the batch, so an epoch costs about
``n_users x n_items`` dot products per batch regardless of how many positives a user has.
With ``graph_dropout`` > 0 the training loss propagates over a copy of the train graph with that
fraction of the edges pruned (FREEDOM's degree-sensitive draw, ``1/sqrt(d_u d_i)``), drawn afresh
each epoch; evaluation uses the full graph.
With ``propagation: sampled`` a training step propagates over a sampled neighbourhood of its batch
instead of the whole graph (``recbole_dppmg.model.sampling``: ``fanouts[h]`` neighbours per node
and hop, full-graph degree normalisation, so the batch's propagated vectors equal full
propagation in expectation): its cost depends on the batch and the fan-outs, not on the graph.
With ``sampled_control_variate`` (default) a step propagates only the change of the layer-0
vectors since the epoch's full-graph snapshot and adds the snapshot's exact output at its seeds
(VR-GCN, Chen et al. 2018; LightGCN is linear), so small fan-outs stay accurate; the snapshot and
the encodings of the neighbourhood's non-batch items are taken once per epoch (linear cost).
``sampled_outer_hop`` decides what a step does with the nodes only the outermost hop reaches
(most of a neighbourhood): train them (``grad``), propagate them without gradient (``no_grad``),
or leave them at the snapshot, neither gathered nor propagated (``snapshot``, GNNAutoScale's
historical embeddings, Fey et al. 2021).
The batch's own items go through the feature MLPs with gradient, the embedding tables have sparse
gradients (``recbole_dppmg.trainer`` steps them with lazy Adam, ``recbole_dppmg.lazy_adam``), and
the softmax loss becomes a sampled softmax over the batch's distinct positive and negative items.
Evaluation, ``full_sort_predict``, k-means, the epoch stats and the token export still propagate
over the full graph, once per evaluation (cached).
With ``score: cosine`` every per-modality user and item vector is L2-normalised before the dot
product (training and evaluation alike), the usual companion of a temperature softmax. During the first
``kmeans_warmup_epochs`` epochs only the continuous BPR (+ L2) trains; the codebooks are seeded
by k-means at the first step and track the users by EMA, so quantized evaluation is meaningful
from epoch 0. After warm-up the codebooks are re-initialised by FAISS k-means on the current
vectors of all users in the training graph and the quantized loss switches on.

Per-epoch hook (RecBole's Trainer calls nothing per epoch):
    ``stats = model.on_epoch_end()`` (``recbole_dppmg.trainer`` calls it, and logs
    ``describe_epoch_stats(stats)``) after each training epoch: counts the epoch, runs the
    post-warm-up k-means, and returns (and keeps, see ``epoch_stats()``) a flat dict of floats:
    ``epoch``, ``restarts/<m>``, and per modality and level ``<m>/L<l>/codes_used``,
    ``<m>/L<l>/perplexity``, ``<m>/L<l>/quant_error`` (fraction of the users' variance left
    after levels ``0..l``) measured over all users in the training graph.
    It is idempotent: a second call without training steps in between returns the same stats.
    Fallback for trainers that do not call it: the first ``train()`` / ``eval()`` call after
    training steps closes the epoch (RecBole's Trainer makes one before every epoch and
    every evaluation), and the stats are logged at INFO.
"""

from __future__ import annotations

import numpy as np
import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.init import xavier_normal_initialization
from recbole.model.loss import BPRLoss, EmbLoss
from recbole.utils import InputType
from torch import nn

from recbole_dppmg.model.config_check import check_config
from recbole_dppmg.model.freedom_graphs import prunable_edges, pruned_adjacency
from recbole_dppmg.model.graph import LightGCNPropagation, normalized_adjacency
from recbole_dppmg.model.modal_features import (
    ID_MODALITY,
    load_modal_features,
    parse_modalities,
)
from recbole_dppmg.model.quantizer import ResidualVectorQuantizer
from recbole_dppmg.model.sampling import propagate_sampled, sample_subgraph


def feature_mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    """Linear layers with LeakyReLU between them (none after the last)."""
    sizes = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)


class DPPMG(GeneralRecommender):
    """Modal-specific LightGCN + residual VQ of per-modality user vectors (see module doc)."""

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_config(config, "DPPMG")  # every key below is set (properties/model/DPPMG.yaml) and valid
        self.modalities = parse_modalities(config)
        features = load_modal_features(dataset, config)
        self.dim = config["embedding_size"]
        self.n_layers = config["n_layers"]
        hidden = config["mlp_hidden_size"]
        if isinstance(hidden, int):
            hidden = [hidden]
        self.levels = config["levels"]
        self.codebook_size = config["codebook_size"]
        self.vq_weight = float(config["vq_weight"])
        self.continuous_bpr_weight = float(config["continuous_bpr_weight"])
        self.reg_weight = float(config["reg_weight"])
        self.kmeans_warmup_epochs = config["kmeans_warmup_epochs"]
        self.eval_quantized = config["eval_quantized"]
        self._eval_levels: int | None = None  # set_eval_quantized(True, l): first l codes only
        self.item_id_residual = config["item_id_residual"]
        self.feature_dropout = float(config["feature_dropout"])
        self.loss_type = config["loss_type"]
        self.temperature = float(config["softmax_temperature"])
        self.cosine = config["score"] == "cosine"
        self.graph_dropout = float(config["graph_dropout"])
        self.sampled = config["propagation"] == "sampled"
        self.fanouts = [int(f) for f in config["fanouts"]]
        self.encoder_grad_all = config["sampled_encoder_grad"] == "all"
        self.control_variate = bool(config["sampled_control_variate"])
        self.outer_hop = config["sampled_outer_hop"]
        quantizer_args = dict(
            levels=self.levels,
            codebook_size=self.codebook_size,
            dim=self.dim,
            commitment_beta=float(config["commitment_beta"]),
            ema_decay=float(config["ema_decay"]),
            dead_code_threshold=float(config["dead_code_threshold"]),
        )

        self.user_embeddings = nn.ModuleDict()
        # id channel: all items; feature channels: items missing the modality (and, with
        # item_id_residual, the residual e_i of the items that have it)
        self.item_embeddings = nn.ModuleDict()
        self.encoders = nn.ModuleDict()
        self.quantizers = nn.ModuleDict()
        for m in self.modalities:
            # sampled mode reads the tables row by row: sparse gradients, so that a step's cost
            # (backward and optimiser) does not grow with the number of users and items
            self.user_embeddings[m] = nn.Embedding(self.n_users, self.dim, sparse=self.sampled)
            self.item_embeddings[m] = nn.Embedding(self.n_items, self.dim, sparse=self.sampled)
            if m != ID_MODALITY:
                feat = features[m]
                self.encoders[m] = feature_mlp(feat.width, list(hidden), self.dim)
                # Derived from the dataset at construction, so kept out of checkpoints.
                self.register_buffer(f"feat_{m}", feat.features, persistent=False)
                self.register_buffer(f"present_{m}", feat.present, persistent=False)
            self.quantizers[m] = ResidualVectorQuantizer(**quantizer_args)

        inter = dataset.inter_matrix(form="coo")
        self.register_buffer("norm_adj", normalized_adjacency(inter, self.n_users, self.n_items), persistent=False)
        # Users with at least one training interaction: they seed the codebooks and are
        # counted in the code stats. Every user of a standard split (row 0 is RecBole's
        # padding user); users held out of the graph (fold-in benchmarks) have untrained
        # vectors, which must not take codes.
        self.register_buffer(
            "graph_users", torch.as_tensor(np.unique(inter.row[inter.row > 0]), dtype=torch.long), persistent=False
        )
        if self.graph_dropout > 0:  # FREEDOM's degree-sensitive pruning, a fresh graph per epoch
            edge_users, edge_items, keep = prunable_edges(inter, self.n_users, self.n_items)
            self.register_buffer("edge_users", edge_users, persistent=False)
            self.register_buffer("edge_items", edge_items, persistent=False)
            self.register_buffer("edge_keep_weights", keep, persistent=False)
        self._train_adj: torch.Tensor | None = None  # this epoch's pruned graph, drawn lazily
        self.propagation = LightGCNPropagation(self.n_layers)
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self.bpr_loss = BPRLoss()
        self.emb_loss = EmbLoss()

        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._neighbour_encodings: dict[str, torch.Tensor] | None = None  # sampled mode, per epoch
        self._snapshot: tuple[torch.Tensor, torch.Tensor] | None = None  # sampled control variate, per epoch
        self._pending_steps = 0  # training steps since the last closed epoch
        self._last_stats: dict[str, float] = {}
        self._closing_epoch = False
        self.apply(xavier_normal_initialization)
        if self.item_id_residual:
            with torch.no_grad():  # residuals start at zero: the content alone at epoch 0
                for m in self.encoders:
                    self.item_embeddings[m].weight[getattr(self, f"present_{m}")] = 0.0

    # ------------------------------------------------------------------ embeddings
    def item_ego_embeddings(
        self,
        dropout: bool = False,
        items: torch.Tensor | None = None,
        encoder_grad: bool = True,
        encoded: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Layer-0 item embeddings per modality ``[n_items, dim]`` (before propagation), or of
        the items ``items`` only (``[len(items), dim]``, the table read row by row);
        ``dropout``: apply ``feature_dropout`` to the features (the training loss does);
        ``encoder_grad`` False: the feature encoders run without gradient (the tables keep theirs);
        ``encoded``: the feature encodings of every item, already computed (read, not recomputed)."""
        out = {}
        for m in self.modalities:
            table = self.item_embeddings[m].weight if items is None else self.item_embeddings[m](items)
            if m == ID_MODALITY:
                out[m] = table
                continue
            present = getattr(self, f"present_{m}")
            if items is not None:
                present = present[items]
            if encoded is not None:
                encoding = encoded[m] if items is None else encoded[m][items]
            else:
                encoding = self._encode(m, items, dropout, encoder_grad)
            present = present.unsqueeze(1)
            if self.item_id_residual:
                out[m] = torch.where(present, encoding, torch.zeros_like(encoding)) + table
            else:
                out[m] = torch.where(present, encoding, table)
        return out

    def _encode(self, m: str, items: torch.Tensor | None, dropout: bool, encoder_grad: bool) -> torch.Tensor:
        """The feature MLP of modality ``m`` on all items or on ``items``."""
        feats = getattr(self, f"feat_{m}")
        if items is not None:
            feats = feats[items]
        if dropout and self.feature_dropout > 0:
            # Inverted dropout from a uniform draw: the same masks in distribution as
            # F.dropout, whose bernoulli_ took a quarter of a CPU training step (measured).
            keep = torch.rand_like(feats) >= self.feature_dropout
            feats = feats * keep / (1.0 - self.feature_dropout)
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            return self.encoders[m](feats)

    @torch.no_grad()
    def neighbour_encodings(self) -> dict[str, torch.Tensor]:
        """Every item's feature encoding without gradient, computed once per training epoch:
        sampled mode's neighbourhood items outside the batch read it (``sampled_encoder_grad:
        batch``), so a step does not gather and encode the wide features of tens of thousands of
        neighbours (at 10^7 interactions that was a third of a step). Within an epoch these
        encodings lag the MLPs by the epoch's steps, the historical-embedding approximation of
        GNNAutoScale (Fey et al., 2021); the batch's own items are always encoded fresh."""
        if self._neighbour_encodings is None:
            chunk = 65536  # bounds the gathered feature rows held at once
            self._neighbour_encodings = {
                m: torch.cat(
                    [
                        self.encoders[m](getattr(self, f"feat_{m}")[start : start + chunk])
                        for start in range(0, self.n_items, chunk)
                    ]
                )
                for m in self.encoders
            }
        return self._neighbour_encodings

    def training_adjacency(self) -> torch.Tensor:
        """The graph the training loss propagates over: the train graph, or with ``graph_dropout``
        this epoch's degree-sensitively pruned copy of it (re-normalised; drawn once per epoch)."""
        if self.graph_dropout <= 0:
            return self.norm_adj
        if self._train_adj is None:
            self._train_adj = pruned_adjacency(
                self.edge_users, self.edge_items, self.edge_keep_weights, self.graph_dropout, self.n_users, self.n_items
            )
        return self._train_adj

    def layer0_vectors(self, items: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every node's layer-0 vector ``[n_users + n_items, M*dim]``: the user tables over the
        layer-0 items ``items``, the modalities side by side (one spmm propagates them all)."""
        return torch.cat([torch.cat([self.user_embeddings[m].weight, items[m]], 0) for m in self.modalities], 1)

    def forward(
        self,
        items: dict[str, torch.Tensor] | None = None,
        rows: tuple[torch.Tensor, torch.Tensor] | None = None,
        adj: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Propagated (continuous) user and item embeddings per modality (``items``: layer-0
        item embeddings if already computed); ``rows``: (user ids, item ids) to return instead
        of all users and items (the last layer is then computed for those rows only); ``adj``:
        the graph (default: the full train graph)."""
        if items is None:
            items = self.item_ego_embeddings()
        ego = self.layer0_vectors(items)
        n_users = self.n_users
        if rows is not None:
            n_users = len(rows[0])
            rows = torch.cat([rows[0], self.n_users + rows[1]])
        out = self.propagation(ego, self.norm_adj if adj is None else adj, rows)  # all modalities share one spmm
        users, items = {}, {}
        for k, m in enumerate(self.modalities):
            block = out[:, k * self.dim : (k + 1) * self.dim]
            users[m], items[m] = block[:n_users], block[n_users:]
        return users, items

    def forward_sampled(
        self, users: torch.Tensor, items: torch.Tensor, adj: torch.Tensor, dropout: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Propagated user and item vectors per modality for the distinct ``users`` and ``items``
        over a sampled neighbourhood of them in ``adj`` (``fanouts``; see module doc), and the
        layer-0 vectors of those items ``[len(items), M*dim]`` (for the L2 penalty). Only the
        subgraph's rows of the tables and the subgraph's items' features are read."""
        seeds = torch.cat([users, self.n_users + items])
        subgraph = sample_subgraph(adj, seeds, self.fanouts, close_last_hop=self.outer_hop == "snapshot")

        def users_ego(ids):
            return torch.cat([self.user_embeddings[m](ids) for m in self.modalities], 1)

        def items_ego(ids, **kwargs):
            ego_items = self.item_ego_embeddings(items=ids, **kwargs)
            return torch.cat([ego_items[m] for m in self.modalities], 1)

        def neighbours_ego(start: int, end: int) -> list[torch.Tensor]:
            # rows nodes[start:end], none of the batch's: items from the per-epoch encodings under
            # sampled_encoder_grad "batch" (no dropout, no encoder gradient; their table rows still
            # train). Each hop's new nodes come in increasing order (append_nodes), users first, so
            # the rows are read hop by hop in place, without a permutation.
            bounds = [b for b in subgraph.sizes if start < b < end]
            parts = []
            for low, high in zip([start, *bounds], [*bounds, end]):
                nodes = subgraph.nodes[low:high]
                n_hop_users = int(torch.searchsorted(nodes, self.n_users))
                parts.append(users_ego(nodes[:n_hop_users]))
                hop_items = nodes[n_hop_users:] - self.n_users
                if self.encoder_grad_all:
                    parts.append(items_ego(hop_items, dropout=dropout))
                else:
                    parts.append(items_ego(hop_items, encoded=self.neighbour_encodings()))
            return parts

        def layer0(nodes, ego):  # what is propagated: the change since the snapshot, or the vectors
            return ego - self.propagation_snapshot(adj)[0][nodes] if self.control_variate else ego

        # sampled_outer_hop no_grad: the outermost hop's nodes enter without gradient
        inner_end = subgraph.sizes[-2] if self.outer_hop == "no_grad" and subgraph.blocks else len(subgraph.nodes)
        inner = neighbours_ego(len(seeds), inner_end)  # before the batch: the order of draws
        batch_items = items_ego(items, dropout=dropout)
        x = layer0(subgraph.nodes[:inner_end], torch.cat([users_ego(users), batch_items, *inner]))
        outer = None
        if inner_end < len(subgraph.nodes):
            with torch.no_grad():
                outer = layer0(subgraph.nodes[inner_end:], torch.cat(neighbours_ego(inner_end, len(subgraph.nodes))))
        out = propagate_sampled(x, subgraph, outer)
        if self.control_variate:
            out = out + self.propagation_snapshot(adj)[1][seeds]
        n_users = len(users)
        users_out, items_out = {}, {}
        for k, m in enumerate(self.modalities):
            block = out[:, k * self.dim : (k + 1) * self.dim]
            users_out[m], items_out[m] = block[:n_users], block[n_users:]
        return users_out, items_out, batch_items

    def prepare_training_epoch(self) -> None:
        """Take the epoch's per-epoch state now (sampled mode: the neighbour encodings and the
        control-variate snapshot) instead of at the epoch's first step; a benchmark that times a
        few steps and scales them to an epoch times this apart, once per epoch."""
        if self.sampled and self.training:
            self.neighbour_encodings()
            if self.control_variate:
                self.propagation_snapshot(self.training_adjacency())

    @torch.no_grad()
    def propagation_snapshot(self, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, P x0)``: every node's layer-0 vector ``[N, M*dim]`` and its full-graph LightGCN
        output over ``adj``, taken once per training epoch (the VR-GCN control variate of Chen,
        Zhu and Song, 2018). LightGCN is linear, ``P x = P x0 + P (x - x0)``, so a step propagates
        only the change since the snapshot over its sampled neighbourhood and adds the exact
        snapshot output of its seeds: unbiased as before, and exact at the snapshot whatever the
        fan-outs, so the sampling noise shrinks to that of the epoch's drift. The snapshot costs
        one full propagation per epoch (linear in the edges)."""
        if self._snapshot is None:
            items = self.item_ego_embeddings(encoded=self.neighbour_encodings())
            ego = self.layer0_vectors(items)
            self._snapshot = (ego, self.propagation(ego, adj))
        return self._snapshot

    # ------------------------------------------------------------------ quantizer lifecycle
    @torch.no_grad()
    def _kmeans_init(self) -> None:
        users, _ = self.forward()
        for m in self.modalities:
            self.quantizers[m].kmeans_init(users[m][self.graph_users])

    def _ensure_initialized(self) -> None:
        if not all(q.is_initialized for q in self.quantizers.values()):
            self._kmeans_init()

    @property
    def in_warmup(self) -> bool:
        return int(self.epochs_done) < self.kmeans_warmup_epochs

    @torch.no_grad()
    def on_epoch_end(self) -> dict[str, float]:
        """Close a training epoch: count it, run the post-warm-up k-means, return stats."""
        if self._pending_steps == 0:
            return self._last_stats
        self._pending_steps = 0
        self.epochs_done += 1
        self._ensure_initialized()
        if self.kmeans_warmup_epochs > 0 and int(self.epochs_done) == self.kmeans_warmup_epochs:
            self._kmeans_init()
            self.logger.info(f"DPPMG: codebooks re-initialised by k-means after epoch {int(self.epochs_done)}")
        self._clear_cache()
        self._last_stats = self._compute_stats()
        return self._last_stats

    def describe_epoch_stats(self, stats: dict[str, float]) -> str:
        """One log line for ``stats`` (``recbole_dppmg.trainer`` logs it after each epoch)."""
        return format_stats(stats, self.modalities, self.levels)

    def epoch_stats(self) -> dict[str, float]:
        """Stats of the last closed epoch (empty before the first)."""
        return dict(self._last_stats)

    @torch.no_grad()
    def _compute_stats(self) -> dict[str, float]:
        users, _ = self.forward()
        stats: dict[str, float] = {"epoch": float(int(self.epochs_done))}
        for m in self.modalities:
            per_level = self.quantizers[m].code_stats(users[m][self.graph_users])
            for level in range(self.levels):
                for key, values in per_level.items():
                    stats[f"{m}/L{level}/{key}"] = float(values[level])
            stats[f"restarts/{m}"] = float(self.quantizers[m].restarts.sum())
        return stats

    def train(self, mode: bool = True):
        if self._pending_steps and not self._closing_epoch:
            self._closing_epoch = True
            try:
                stats = self.on_epoch_end()
            finally:
                self._closing_epoch = False
            self.logger.info(f"DPPMG epoch {stats['epoch']:.0f} stats: " + self.describe_epoch_stats(stats))
        if mode:
            self._clear_cache()
            self._clear_epoch_state()
            self._train_adj = None  # the next training step draws this epoch's pruned graph
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._clear_cache()
        self._clear_epoch_state()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _clear_cache(self) -> None:
        self._cache = None

    def _clear_epoch_state(self) -> None:
        """Sampled mode's per-epoch state (neighbour encodings, control-variate snapshot) is
        retaken at the next training step."""
        self._neighbour_encodings = None
        self._snapshot = None

    # ------------------------------------------------------------------ scoring
    def _scoring_vectors(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-modality vectors concatenated ``[rows, M*dim]``, each L2-normalised under cosine."""
        if self.cosine:
            vectors = {m: nn.functional.normalize(v, dim=-1) for m, v in vectors.items()}
        return torch.cat([vectors[m] for m in self.modalities], -1)

    def score_pairs(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        """``score(u_r, i_r)`` for aligned rows: the sum over modalities of dot products."""
        return (self._scoring_vectors(users) * self._scoring_vectors(items)).sum(-1)

    def score_matrix(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[n_user_rows, n_item_rows]`` scores of every user row against every item row."""
        return self._scoring_vectors(users) @ self._scoring_vectors(items).t()

    # ------------------------------------------------------------------ RecBole contract
    def calculate_loss(self, interaction):
        self._clear_cache()
        self._ensure_initialized()
        if self.training:
            self._pending_steps += 1
        user = interaction[self.USER_ID]
        pos = interaction[self.ITEM_ID]
        neg = interaction[self.NEG_ITEM_ID]
        # full mode: the layer-0 items (dropout draw) before this epoch's pruned graph is drawn, the
        # order of the random draws every full-mode run so far was made with
        ego_items = None if self.sampled else self.item_ego_embeddings(dropout=self.training)
        # Only the batch's users and items are propagated to the end (cheaper last layer).
        # Each user is quantized once per step, so EMA counts are per-user usages.
        unique_users, inverse = torch.unique(user, return_inverse=True)
        if self.loss_type == "softmax" and not self.sampled:
            batch_items = torch.arange(self.n_items, device=pos.device)
            pos_at, neg_at = pos, neg
        else:  # sampled mode's softmax runs over the batch's distinct positive and negative items
            batch_items, item_index = torch.unique(torch.cat([pos, neg]), return_inverse=True)
            pos_at, neg_at = item_index[: len(pos)], item_index[len(pos) :]
        adj = self.training_adjacency() if self.training else self.norm_adj
        if self.sampled:
            users, items, batch_ego = self.forward_sampled(unique_users, batch_items, adj, dropout=self.training)
            reg_items = {m: batch_ego[:, k * self.dim : (k + 1) * self.dim] for k, m in enumerate(self.modalities)}
            reg_pos = {m: v[pos_at] for m, v in reg_items.items()}
            reg_neg = {m: v[neg_at] for m, v in reg_items.items()}
        else:
            users, items = self.forward(ego_items, rows=(unique_users, batch_items), adj=adj)
            reg_pos = {m: v[pos] for m, v in ego_items.items()}
            reg_neg = {m: v[neg] for m, v in ego_items.items()}
        users_c, users_q = {}, {}
        vq_loss = users[self.modalities[0]].new_zeros(())
        for m in self.modalities:
            out = self.quantizers[m](users[m])
            users_c[m], users_q[m] = users[m], out.quantized
            vq_loss = vq_loss + out.commitment_loss

        def ranking_loss(user_vectors: dict[str, torch.Tensor]) -> torch.Tensor:
            if self.loss_type == "softmax":  # [distinct users, n_items] scores, one row per user
                scores = self.score_matrix(user_vectors, items) / self.temperature
                scores[:, batch_items == 0] = float("-inf")  # RecBole's padding item is never a candidate
                log_probs = torch.log_softmax(scores, dim=1)
                return -log_probs[inverse, pos_at].mean()
            u = {m: v[inverse] for m, v in user_vectors.items()}
            pos_score = self.score_pairs(u, {m: v[pos_at] for m, v in items.items()})
            neg_score = self.score_pairs(u, {m: v[neg_at] for m, v in items.items()})
            return self.bpr_loss(pos_score, neg_score)

        if self.in_warmup:
            rec_loss = ranking_loss(users_c)
            vq_loss = vq_loss.detach() * 0.0
        else:
            rec_loss = ranking_loss(users_q)
            if self.continuous_bpr_weight > 0:
                rec_loss = rec_loss + self.continuous_bpr_weight * ranking_loss(users_c)
            vq_loss = self.vq_weight * vq_loss

        reg_loss = self.emb_loss(
            *[self.user_embeddings[m](user) for m in self.modalities],
            *[reg_pos[m] for m in self.modalities],
            *[reg_neg[m] for m in self.modalities],
        )
        return rec_loss, vq_loss, self.reg_weight * reg_loss

    @torch.no_grad()
    def _eval_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated user ``[n_users, M*dim]`` and item vectors used for scoring, cached."""
        if self._cache is None:
            users = self.user_modal_vectors(quantized=self.eval_quantized, levels=self._eval_levels)
            _, items = self.forward()
            self._cache = (self._scoring_vectors(users), self._scoring_vectors(items))
        return self._cache

    def predict(self, interaction):
        user_e, item_e = self._eval_vectors()
        user = interaction[self.USER_ID]
        item = interaction[self.ITEM_ID]
        return (user_e[user] * item_e[item]).sum(1)

    def full_sort_predict(self, interaction):
        user_e, item_e = self._eval_vectors()
        user = interaction[self.USER_ID]
        return (user_e[user] @ item_e.t()).view(-1)

    def run_summary(self, test_data=None, trainer=None) -> dict:
        """Extras for the run's result (``recbole_dppmg.quick_start`` calls this after the test
        evaluation, best weights loaded): code usage over all users and test metrics of both
        the quantized and the continuous path, so the cost of quantization is measured; and
        ``test_quantized_levels``: test NDCG@10 when users keep only their first ``l`` codes
        (``l = 1..levels``, the same trained model), what each residual level adds."""
        self._ensure_initialized()
        summary: dict = {
            "code_stats": self._compute_stats(),
            "quantizer": {
                "modalities": list(self.modalities),
                "levels": self.levels,
                "codebook_size": self.codebook_size,
                "graph_users": int(len(self.graph_users)),
            },
        }
        if test_data is not None and trainer is not None:
            chosen = self.eval_quantized
            try:
                for quantized in (True, False):
                    self.set_eval_quantized(quantized)
                    result = trainer.evaluate(test_data, load_best_model=False)
                    path = "quantized" if quantized else "continuous"
                    summary[f"test_{path}"] = {k: float(v) for k, v in result.items()}
                summary["test_quantized_levels"] = {}
                for levels in range(1, self.levels + 1):
                    self.set_eval_quantized(True, levels)
                    result = trainer.evaluate(test_data, load_best_model=False)
                    summary["test_quantized_levels"][str(levels)] = float(result.get("ndcg@10", float("nan")))
            finally:
                self.set_eval_quantized(chosen)
        return summary

    # ------------------------------------------------------------------ export API
    def set_eval_quantized(self, quantized: bool, levels: int | None = None) -> None:
        """Score with quantized (True) or continuous (False) user vectors from now on;
        ``levels``: decode only the first ``levels`` codes of each user (None: all)."""
        if levels is not None and not 1 <= levels <= self.levels:
            raise ValueError(f"levels must be in 1..{self.levels}, got {levels}")
        self.eval_quantized = bool(quantized)
        self._eval_levels = levels
        self._clear_cache()

    @torch.no_grad()
    def user_modal_vectors(self, quantized: bool = False, levels: int | None = None) -> dict[str, torch.Tensor]:
        """Per modality, all users' propagated vectors ``[n_users, dim]`` (decoded codes if
        ``quantized``: all of them, or the first ``levels``)."""
        self._ensure_initialized()
        users, _ = self.forward()
        if quantized:
            users = {m: self.quantizers[m].decode(self.quantizers[m].encode(users[m])[:, :levels]) for m in users}
        return users

    @torch.no_grad()
    def item_modal_vectors(self, propagated: bool = True) -> dict[str, torch.Tensor]:
        """Per modality, all items' vectors ``[n_items, dim]``: the propagated ones that users
        are scored against, or the layer-0 ones (``propagated=False``, e.g. for fold-in)."""
        if propagated:
            return self.forward()[1]
        return {m: v.detach() for m, v in self.item_ego_embeddings().items()}

    @torch.no_grad()
    def codebooks(self) -> dict[str, torch.Tensor]:
        """Per modality, the codebooks ``[levels, codebook_size, dim]``."""
        self._ensure_initialized()
        return {m: self.quantizers[m].codebooks.clone() for m in self.modalities}

    @torch.no_grad()
    def user_codes(self) -> torch.Tensor:
        """Codes of all users ``[n_users, n_modalities, levels]``, modalities in config order."""
        users = self.user_modal_vectors(quantized=False)
        return torch.stack([self.quantizers[m].encode(users[m]) for m in self.modalities], 1)


def format_stats(stats: dict[str, float], modalities: list[str], levels: int) -> str:
    """One log line: ``text used 250/246/240 ppl 210/... err 0.41/0.22/0.12 | image ...``."""
    parts = []
    for m in modalities:
        used = "/".join(f"{stats.get(f'{m}/L{l}/codes_used', 0):.0f}" for l in range(levels))
        ppl = "/".join(f"{stats.get(f'{m}/L{l}/perplexity', 0):.1f}" for l in range(levels))
        err = "/".join(f"{stats.get(f'{m}/L{l}/quant_error', 0):.3f}" for l in range(levels))
        parts.append(f"{m} used {used} ppl {ppl} err {err} restarts {stats.get(f'restarts/{m}', 0):.0f}")
    return " | ".join(parts)
