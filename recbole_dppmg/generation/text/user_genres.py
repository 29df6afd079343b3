"""A user's taste in words: the genres over-represented among the items a user likes.

Used by the ``{user_genres}`` field of ``text.target_template``. Why: one liked item's plot is
a lottery as a target (any of ~50 liked films), so the tokens learn the catalogue's style and
little about the user; a genre profile is the same for all of a user's targets, and its words
alone retrieve the user's held-out films as well as the real text of their best training item.

Two sources (``text.user_genres_from``):

- ``tokens``: the :data:`TOP_ITEMS` items the user's own decoded tokens score highest in stage 1
  relative to the average user. A function of the tokens, so the generator can learn it exactly
  and another user's tokens give another profile.
- ``history``: the user's liked training-split items (their real taste, of which the tokens only
  carry a part).

Either way a genre ranks by lift: its share among those items over its share among all users'
liked training items (so Drama, liked by everyone, does not win every profile).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from recbole_dppmg.data.item_content import MissingContentError
from recbole_dppmg.generation.common.settings import GENRE_SOURCES, check_genre_settings  # noqa: F401  (re-exported)

TOP_ITEMS = 20  # items of the token source
UNKNOWN = "unknown"


class UserGenres:
    """``user -> "Horror, Thriller, Action"`` (cached per user)."""

    def __init__(
        self,
        tokens,
        item_genres: dict[str, list[str]],
        source: str = "tokens",
        count: int = 3,
        min_rating: float | None = 4,
    ):
        check_genre_settings(source, count)
        self.tokens, self.item_genres, self.source, self.count, self.min_rating = (
            tokens,
            item_genres,
            source,
            count,
            min_rating,
        )
        prior = Counter()
        for user in tokens.users:
            prior.update(self._genres_of(self._liked(user)))
        total = sum(prior.values())
        self._prior = {g: n / total for g, n in prior.items()} if total else {}
        self._cache: dict[str, str] = {}
        self._token_scores = None  # [users, items], computed once for the token source

    def _liked(self, user) -> list[str]:
        return [item for item, _ in self.tokens.history(user, "train", self.min_rating)]

    def _genres_of(self, items: Iterable[str]) -> list[str]:
        return [g for item in items for g in self.item_genres.get(str(item), ()) if g != UNKNOWN]

    def _items(self, user) -> list[str]:
        if self.source == "history":
            return self._liked(user)
        if self._token_scores is None:  # one batch: the relative scores subtract a mean over all users
            self._token_scores = self.tokens.token_scores(self.tokens.users, relative=True)
        scores = self._token_scores[self.tokens.user_row(user) - 1]  # row 0 of the export is the padding user
        order = [k for k in np.argsort(-scores, kind="stable") if k > 0]  # column 0 is the padding item
        return [self.tokens.item_ids[k] for k in order[:TOP_ITEMS]]

    def __call__(self, user) -> str:
        user = str(user)
        if user not in self._cache:
            counts = Counter(self._genres_of(self._items(user)))
            total = sum(counts.values())
            lift = {g: (n / total) / self._prior.get(g, n / total) for g, n in counts.items()}
            ranked = sorted(counts, key=lambda g: (-lift[g], -counts[g], g))[: self.count]
            self._cache[user] = ", ".join(ranked) if ranked else UNKNOWN
        return self._cache[user]


def genres_by_item(content) -> dict[str, list[str]]:
    """``item_id -> [tag, ...]`` of a dataset's items (``ItemContent``'s tags role: genres, categories)."""
    if not content.has("tags"):
        raise MissingContentError(
            f"text.target_template uses {{user_genres}}, but {content.dataset} has no item tags: set tags_field in "
            "its prepare spec, or text.target_template to a shape without it, e.g. '{head}: {plot}'"
        )
    return content.tags_by_item()
