"""The preference vocabulary and codebook projection shared by the generators."""

import numpy as np
import pytest
import torch

from recbole_dppmg.errors import CheckpointError
from recbole_dppmg.generation.common.vocabulary import (
    CodebookProjection,
    PreferenceVocabulary,
)


class FakeTokens:
    modalities = ["text", "image"]
    levels, codebook_size, dim = 2, 3, 4
    codebooks = {m: np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + k for k, m in enumerate(modalities)}

    def codes_for(self, user_id):
        return np.array([[2, 0], [1, 1]])


def test_vocabulary_order_and_user_ids():
    vocab = PreferenceVocabulary(FakeTokens())
    assert len(vocab) == 12 and vocab.strings[0] == "<txt_0_0>" and vocab.strings[6] == "<img_0_0>"
    assert vocab.ids_for("u") == [2, 3, 7, 10]
    assert vocab.strings_for("u") == ["<txt_0_2>", "<txt_1_0>", "<img_0_1>", "<img_1_1>"]
    assert torch.equal(vocab.vectors[7], torch.from_numpy(FakeTokens.codebooks["image"][0, 1]))


def test_incompatible_export_is_refused():
    vocab = PreferenceVocabulary(FakeTokens())
    with pytest.raises(CheckpointError, match="token export has 2 levels x 3 codes"):
        vocab.check_compatible(levels=2, codebook_size=256, modalities=["text", "image"])


def test_projection_scale_and_gradients():
    vectors = torch.randn(12, 4)
    projection = CodebookProjection(vectors, out_dim=16, target_scale=2.0)
    out = projection()
    assert out.shape == (12, 16)
    assert out.norm(dim=1).mean().item() == pytest.approx(2.0, rel=1e-4)
    out.sum().backward()
    assert projection.linear.weight.grad is not None and projection.codebook_vectors.grad is None


def test_routing_keeps_only_the_chosen_channels():
    from recbole_dppmg.errors import ConfigError

    vocab = PreferenceVocabulary(FakeTokens())
    assert vocab.strings_for("u", ["image"]) == ["<img_0_1>", "<img_1_1>"] and vocab.ids_for("u", ["text"]) == [2, 3]
    assert vocab.slot_modalities() == ["text", "text", "image", "image"]
    with pytest.raises(ConfigError, match="token_channels \\['id'\\]: give a non-empty subset"):
        vocab.ids_for("u", ["id"])
