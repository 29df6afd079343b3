"""The generation evaluation protocol: own minus shuffled is exactly zero for content that does
not depend on the user, positive for content that does; selection reads validation users only;
the held-out judge (EASE + a content head) ranks a user's own taste above another's."""

import numpy as np
import pytest
import scipy.sparse as sp

from recbole_dppmg.errors import ConfigError, DataError
from recbole_dppmg.generation.common.protocol import (
    bootstrap_interval,
    evaluation_users,
    own_minus_shuffled,
    partner_rows,
    retrieval_scorer,
    users_with_targets,
)
from recbole_dppmg.generation.reward.heldout_judge import HeldoutJudge, ease_weights

CLUSTERS, PER_CLUSTER, USERS = 4, 12, 40


def clustered(seed=0):
    """Items in clusters with features near their cluster centre; users like one cluster:
    training items and test items from it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, 16))
    cluster = np.repeat(np.arange(CLUSTERS), PER_CLUSTER)
    features = centres[cluster] + 0.3 * rng.normal(size=(len(cluster), 16))
    train, test = [], []
    for u in range(USERS):
        own = rng.permutation(np.flatnonzero(cluster == u % CLUSTERS))
        train.append(own[:6].tolist())
        test.append(own[6:9].tolist())
    return features.astype(np.float32), cluster, train, test


def test_partners_are_a_derangement_and_seeded():
    partner = partner_rows(7, seed=3)
    assert sorted(partner) == list(range(7)) and all(partner != np.arange(7))
    assert (partner == partner_rows(7, seed=3)).all() and not (partner == partner_rows(7, seed=4)).all()
    with pytest.raises(DataError, match="at least two users"):
        partner_rows(1, 0)


def test_a_constant_text_scores_exactly_zero_and_own_content_scores_above_zero():
    features, cluster, train, test = clustered()
    users = users_with_targets(test, train)
    targets, exclude = [test[u] for u in users], [train[u] for u in users]
    n = len(users)
    constant = np.repeat(features[:1], n, 0)  # the same item's content for everybody
    gap = own_minus_shuffled(retrieval_scorer(constant, features, targets, exclude, 10), n, seed=0)
    assert gap["mean"] == pytest.approx(0.0, abs=1e-12) and gap["own"] == pytest.approx(gap["shuffled"])

    own_taste = np.stack([features[test[u][0]] for u in users])  # content of one of the user's own test items
    gap = own_minus_shuffled(retrieval_scorer(own_taste, features, targets, exclude, 10), n, seed=0)
    assert gap["mean"] > 0.2 and gap["ci95"][0] > 0


def test_every_measure_of_user_independent_content_is_zero_on_average():
    """Any per-user score function: a constant content row gives the same per-user values for
    own and partner terms up to the permutation, so the mean gap is 0."""
    rng = np.random.default_rng(1)
    table = rng.random(30)  # judge(u) of the one constant content
    gap = own_minus_shuffled(lambda rows, judged_as: table[np.asarray(judged_as)], 30, seed=5)
    assert gap["mean"] == pytest.approx(0.0, abs=1e-12)


def test_evaluation_users_keep_test_users_out_of_selection():
    split = {"train": ["a", "b"], "valid": ["v1", "v2", "v3"], "test": ["t1", "t2"]}
    assert evaluation_users(split, "valid") == ["v1", "v2", "v3"]
    assert evaluation_users(split, "valid", 2) == ["v1", "v2"] and evaluation_users(split, "test") == ["t1", "t2"]
    with pytest.raises(ConfigError, match="must be one of valid, test"):
        evaluation_users(split, "train")


def test_bootstrap_interval_contains_the_mean():
    low, high = bootstrap_interval(np.arange(10.0))
    assert low < 4.5 < high


def test_ease_weights_have_a_zero_diagonal_and_fit_co_occurrence():
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32))
    b = ease_weights(x, l2=0.5)
    assert np.allclose(np.diag(b), 0) and b[0, 1] > 0 and abs(b[0, 2]) < 1e-6


class _Tokens:
    def __init__(self, train):
        rows, cols = zip(*[(u + 1, i + 1) for u, items in enumerate(train) for i in items])
        self.matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(USERS + 1, CLUSTERS * PER_CLUSTER + 1))
        self.user_index = {f"u{u}": u + 1 for u in range(USERS)}
        self.item_index = {str(i): i + 1 for i in range(CLUSTERS * PER_CLUSTER)}

    def split_matrix(self, split):
        return self.matrix


def test_the_heldout_judge_prefers_the_users_own_taste():
    features, cluster, train, test = clustered()
    judge = HeldoutJudge.for_export(
        _Tokens(train), {"text": ([str(i) for i in range(len(features))], features)}, l2=10.0
    )
    users = [f"u{u}" for u in range(USERS)]
    own = np.stack([features[test[u][0]] for u in range(USERS)])
    own_score = judge.personalization(users, "text", own)
    other = np.stack([features[test[(u + 1) % USERS][0]] for u in range(USERS)])  # the next cluster's item
    assert own_score.mean() > 0.7 and own_score.mean() > judge.personalization(users, "text", other).mean() + 0.3
    constant = np.repeat(features[:1], USERS, 0)
    gap = own_minus_shuffled(
        lambda rows, judged_as: judge.personalization([users[j] for j in judged_as], "text", constant[rows]),
        USERS,
        seed=0,
    )
    assert gap["mean"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DataError, match="no image catalogue"):
        judge.personalization(users, "image", own)
