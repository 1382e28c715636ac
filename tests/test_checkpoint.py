import pytest
import torch
from conftest import tiny_model

from densa.checkpoint import load_model, save_checkpoint


@pytest.mark.parametrize("overrides", [{}, {"complex_ema": True, "tie_word_embeddings": False},
                                       {"mixer": "attention"}])
def test_save_load_is_exact(tmp_path, overrides):
    model = tiny_model(**overrides)
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck").eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_refuses_to_overwrite_and_reports_missing(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_checkpoint(tiny_model(), tmp_path / "ck")
    save_checkpoint(tiny_model(mixer="attention"), tmp_path / "ck", overwrite=True)
    assert load_model(tmp_path / "ck").config.mixer == "attention"
    with pytest.raises(FileNotFoundError, match="not a densa checkpoint"):
        load_model(tmp_path / "nothing")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left behind
