"""The one train / valid / test split of users shared by every generator.

Text and poster are judged together (the consistency reward, the report's per-user gallery),
so both generators must hold out exactly the same users: each calls ``split_users`` with the
same seed (``split_seed``, else ``seed``), ``valid_users`` and ``test_users`` (the defaults in
``properties/generation.yaml`` agree), and the evaluation checks that their ``test`` lists are equal.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from recbole_dppmg.errors import ConfigError


def split_users(
    users: Sequence[str], n_valid: int, n_test: int, seed: int, n_train: int | None = None
) -> dict[str, list[str]]:
    """Seeded, disjoint ``{"train", "valid", "test"}`` users; held-out users are never trained on.

    The split depends only on the user list (in the token export's order), the counts and the
    seed, never on the modality, so two generators with the same settings agree.
    """
    users = [str(u) for u in users]
    if min(n_valid, n_test) < 0:
        raise ConfigError(f"valid_users and test_users must be >= 0, got {n_valid} and {n_test}")
    if n_valid + n_test >= len(users):
        raise ConfigError(
            f"cannot hold out {n_valid} valid + {n_test} test users of {len(users)}; lower valid_users / test_users"
        )
    order = np.random.default_rng(seed).permutation(len(users))
    shuffled = [users[k] for k in order]
    test, valid, train = shuffled[:n_test], shuffled[n_test : n_test + n_valid], shuffled[n_test + n_valid :]
    if n_train is not None:
        train = train[:n_train]
    return {"train": train, "valid": valid, "test": test}


def split_seed(settings: Mapping) -> int:
    """The seed of the user split: ``split_seed`` when set, else ``seed``. Training replicates
    (another ``seed``) keep ``split_seed`` fixed so that every replicate holds out the same users."""
    value = settings.get("split_seed")
    return int(settings["seed"] if value is None else value)
