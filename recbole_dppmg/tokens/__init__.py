"""Token export: the contract between stage 1 (DPPMG) and stage 2 (generators)."""

from recbole_dppmg.tokens.preference_tokens import PreferenceTokens

__all__ = ["PreferenceTokens"]
