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


def test_stale_save_temporaries_are_recognised_and_nothing_else(tmp_path):
    from densa.train.state import remove_stale_temporaries

    ckpts = tmp_path / "checkpoints"
    ours = [".step-6.k2j3", ".step-6.old.a1b2", "..step-6.k2j3.x9y8"]  # mkdtemp's, the re-save's, save_checkpoint's
    theirs = ["step-6", ".step-x.k2j3", "...step-6.k2", ".stepping.1", "notes", ".git"]
    for name in ours + theirs:
        (ckpts / name).mkdir(parents=True)
    (ckpts / ".step-7.file").write_text("")  # a file, not a folder: left alone
    assert [p.name for p in remove_stale_temporaries(ckpts)] == sorted(ours)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted([*theirs, ".step-7.file"])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_truncated_training_checkpoint_is_reported_as_damaged(tmp_path):
    from densa.train.state import STATE_FILE, DamagedCheckpoint, load_training_checkpoint

    model = tiny_model()
    save_checkpoint(model, tmp_path / "ck")
    torch.save({"step": 1}, tmp_path / "ck" / STATE_FILE)
    assert load_training_checkpoint(tmp_path / "ck", tiny_model()) == {"step": 1}
    with pytest.raises(ValueError, match="do not match the recipe's model") as err:
        load_training_checkpoint(tmp_path / "ck", tiny_model(mixer="attention"))
    assert not isinstance(err.value, DamagedCheckpoint)  # a recipe mismatch is not damage: no fallback
    state = tmp_path / "ck" / STATE_FILE
    state.write_bytes(state.read_bytes()[:-40])
    with pytest.raises(DamagedCheckpoint, match=f"{STATE_FILE}: PytorchStreamReader failed"):
        load_training_checkpoint(tmp_path / "ck", tiny_model())
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DamagedCheckpoint, match="model.safetensors: .*header"):
        load_training_checkpoint(tmp_path / "ck", tiny_model())
