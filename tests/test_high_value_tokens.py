"""High-value tokens: reference scoring, Rho-1 selection, FLOP accounting, value curriculum, noise, the study."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import prepared_shakespeare

from densa.checkpoint import save_checkpoint
from densa.cli import main as cli_main
from densa.config import from_preset
from densa.counting import flops_per_token
from densa.data.corpora import corpus_texts
from densa.data.noise import BOILERPLATE, NoiseConfig, inject_noise, inject_noise_with_spans, noise_share
from densa.data.prepare import load_manifest, prepare, sha256_file
from densa.data.pretrain import PretrainLoader, TokenStream, document_token_values
from densa.data.reference import reference_cost, score_reference
from densa.model.model import DensaModel
from densa.study import high_value_tokens as study
from densa.study.stats import first_crossing, mean_ci
from densa.train.config import TrainConfig
from densa.train.loop import METRICS, train
from densa.train.selection import rho1_objective, select_tokens, select_tokens_reference, selective_loss, token_losses

PEAK = 1e11
CONTEXT = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_model() -> DensaModel:
    torch.manual_seed(1)
    return DensaModel(from_preset("tiny", vocab_size=300, hidden_size=32)).eval()


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """40 documents of tiny-shakespeare in shards of 5,000 tokens, scored by a random tiny reference model."""
    root = tmp_path_factory.mktemp("hvt")
    prepared_shakespeare(root, 60_000, documents=40, shard_tokens=5_000)
    score_reference(root / "data", reference_model(), context=CONTEXT, batch_size=16, training_flops=1e6,
                    progress=False)
    return root


def config(data: Path, **changes) -> TrainConfig:
    base = dict(data=str(data), batch_size=2, context=CONTEXT, steps=6, warmup_steps=2, log_interval=1,
                eval_interval=3, eval_batches=1, checkpoint_interval=3, keep_last=5)
    return TrainConfig(**{**base, **changes})


# --------------------------------------------------------------------------- reference scoring


def test_reference_losses_are_aligned_with_the_tokens(scored):
    data = scored / "data"
    manifest = load_manifest(data)
    ref = manifest["reference"]
    train_files = manifest["splits"]["train"]["files"]
    assert len(ref["files"]) == len(train_files) > 1
    for tok_file, loss_file in zip(train_files, ref["files"], strict=True):
        assert loss_file["name"] == tok_file["name"].replace(".bin", ".refloss.bin")
        assert (data / loss_file["name"]).stat().st_size == 2 * tok_file["tokens"]  # float16
        assert sha256_file(data / loss_file["name"]) == loss_file["sha256"]
    tokens = TokenStream(data, "train")
    losses = TokenStream(data, "train", "refloss")
    all_tokens = tokens.read(0, tokens.tokens)
    assert losses.read(0, 1)[0] == 0.0
    model = reference_model()
    for i in (1, CONTEXT, CONTEXT + 1, 5_000, 5_001, tokens.tokens - 1):  # window edges and a shard boundary
        start = (i - 1) // CONTEXT * CONTEXT  # the scoring window that predicts token i
        window = torch.from_numpy(all_tokens[start:min(start + CONTEXT + 1, tokens.tokens)])[None]
        with torch.no_grad():
            expected = F.cross_entropy(model(window).logits[0, i - start - 1], window[0, i - start]).item()
        assert losses.read(i, 1)[0] == pytest.approx(expected, rel=2e-3, abs=2e-3), i  # float16 storage
    # the loader returns the losses of exactly its windows' tokens
    loader = PretrainLoader(data, "train", 3, CONTEXT, seed=4, reference=True)
    batch, ref_batch = loader.batch(2), loader.reference_batch(2)
    assert ref_batch.shape == batch.shape and ref_batch.dtype == torch.float32
    for row, start in enumerate(loader.starts(2)):
        np.testing.assert_array_equal(batch[row].numpy(), all_tokens[start:start + CONTEXT + 1])
        np.testing.assert_array_equal(ref_batch[row].numpy(), losses.read(start, CONTEXT + 1))
    # document values: -mean loss per document, one per document
    values = document_token_values(data, tokens)
    assert len(ref["document_values"]) == manifest["splits"]["train"]["documents"]
    first_end = int(np.flatnonzero(all_tokens == manifest["eos_id"])[0])
    assert ref["document_values"][0] == pytest.approx(-losses.read(0, first_end + 1).mean(), abs=1e-5)
    assert values[0] == ref["document_values"][0] and values.shape == (tokens.tokens,)
    forward = flops_per_token(model.config, CONTEXT).total
    assert ref["flops_per_token"] == forward and ref["scoring_flops"] == forward * tokens.tokens
    assert reference_cost(manifest) == ref["scoring_flops"] + 1e6


def test_prepare_cli_with_reference_is_deterministic(scored, tmp_path, capsys):
    """`densa prepare --reference CKPT` gives byte-identical loss files to scoring the same model in memory."""
    ckpt = tmp_path / "ref"
    save_checkpoint(reference_model(), ckpt)
    argv = ["prepare", "--corpus", str(scored / "corpus.jsonl"), "--tokenizer", str(scored / "tok"), "--out",
            str(tmp_path / "data"), "--shard-tokens", "5000", "--reference", str(ckpt), "--reference-context",
            str(CONTEXT), "--reference-batch", "16"]
    assert cli_main(argv) == 0
    assert "reference" in capsys.readouterr().out
    ours, theirs = load_manifest(tmp_path / "data")["reference"], load_manifest(scored / "data")["reference"]
    assert [f["sha256"] for f in ours["files"]] == [f["sha256"] for f in theirs["files"]]
    assert ours["weights_sha256"] == theirs["weights_sha256"] and ours["kind"] == "densa-checkpoint"
    assert ours["document_values"] == theirs["document_values"]
    big = tmp_path / "big"
    save_checkpoint(DensaModel(from_preset("tiny", vocab_size=200)), big)
    assert cli_main([*argv[:5], "--out", str(tmp_path / "d2"), "--reference", str(big)]) == 1
    assert "vocab_size 200" in capsys.readouterr().err


# --------------------------------------------------------------------------- selection


def test_selection_fast_path_equals_reference():
    g = torch.Generator().manual_seed(0)
    for shape, fraction in [((2, 7), 0.6), ((3, 16), 0.25), ((1, 5), 1.0), ((4, 9), 0.01)]:
        loss, ref = torch.rand(shape, generator=g) * 5, torch.rand(shape, generator=g) * 5
        mask = select_tokens(loss, ref, fraction)
        assert torch.equal(mask, select_tokens_reference(loss, ref, fraction)), (shape, fraction)
        assert int(mask.sum()) == max(1, round(fraction * loss.numel()))
        value, _ = selective_loss(loss, ref, fraction)
        assert value.item() == pytest.approx(loss[mask].mean().item())
    # the excess decides, not the loss: a token the reference finds just as hard is dropped
    loss, ref = torch.tensor([[5.0, 1.0, 3.0]]), torch.tensor([[5.0, 0.0, 0.5]])
    assert select_tokens(loss, ref, 2 / 3).tolist() == [[False, True, True]]


def test_rho1_objective_gradient_is_the_selected_tokens_only():
    torch.manual_seed(0)
    model = DensaModel(from_preset("tiny", vocab_size=300)).train()
    batch = torch.randint(0, 300, (2, 17))
    ref = torch.rand(2, 16) * 6
    objective = rho1_objective(model(batch, labels=batch), batch, ref, 0.5)
    objective.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch).logits
    tok = token_losses(logits, batch)
    mask = select_tokens(tok, ref, 0.5)
    plain = torch.stack([F.cross_entropy(logits[b, t], batch[b, t + 1]) for b, t in mask.nonzero().tolist()]).mean()
    assert objective.item() == pytest.approx(plain.item(), abs=1e-5)
    plain.backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- trainer: FLOPs, curriculum, resume


def test_flop_count_includes_the_reference(scored, tmp_path):
    data = scored / "data"
    cfg = dict(steps=3, eval_interval=3, checkpoint_interval=3)
    uniform = train(from_preset("tiny", vocab_size=300), config(data, **cfg), tmp_path / "u", progress=False,
                    peak=PEAK)
    selective = train(from_preset("tiny", vocab_size=300), config(data, token_selection="rho1", **cfg),
                      tmp_path / "s", progress=False, peak=PEAK)
    step_flops = flops_per_token(from_preset("tiny", vocab_size=300), CONTEXT).training * 2 * CONTEXT
    charged = reference_cost(load_manifest(data))
    assert uniform.flops == pytest.approx(3 * step_flops)
    assert selective.flops == pytest.approx(charged + 3 * step_flops)
    records = [json.loads(line) for line in (tmp_path / "s" / METRICS).read_text().splitlines()]
    train_flops = [r["flops"] for r in records if r["kind"] == "train"]
    assert train_flops == pytest.approx([charged + k * step_flops for k in (1, 2, 3)])
    assert [r["flops"] for r in records if r["kind"] == "eval"] == pytest.approx([selective.flops])
    assert selective.losses != uniform.losses  # a different objective
    keep_all = train(from_preset("tiny", vocab_size=300), config(data, token_selection="rho1", select_fraction=1.0,
                                                                 **cfg), tmp_path / "all", progress=False, peak=PEAK)
    torch.testing.assert_close(torch.tensor(keep_all.losses), torch.tensor(uniform.losses))  # keeping every token
    assert keep_all.val_loss == pytest.approx(uniform.val_loss, abs=1e-5)                   # is plain training
    unscored = tmp_path / "unscored"
    prepare(str(scored / "corpus.jsonl"), scored / "tok", unscored)
    with pytest.raises(ValueError, match="densa prepare ... --reference MODEL"):
        train(from_preset("tiny", vocab_size=300), config(unscored, token_selection="rho1"), tmp_path / "x",
              progress=False, peak=PEAK)


def test_value_curriculum_reorders_the_same_windows(scored):
    data = scored / "data"
    plain = PretrainLoader(data, "train", 4, CONTEXT, seed=3)
    ordered = PretrainLoader(data, "train", 4, CONTEXT, seed=3, curriculum="value", total_batches=10)
    again = PretrainLoader(data, "train", 4, CONTEXT, seed=3, curriculum="value", total_batches=10)
    drawn = sorted(s for i in range(10) for s in plain.starts(i))
    assert sorted(s for i in range(10) for s in ordered.starts(i)) == drawn  # the same windows, reordered
    assert [ordered.starts(i) for i in range(10)] == [again.starts(i) for i in range(10)]
    values = document_token_values(data, plain.stream)
    window_value = [values[s + 1:s + CONTEXT + 1].mean() for i in range(10) for s in ordered.starts(i)]
    assert window_value == sorted(window_value) and window_value[0] < window_value[-1]
    assert ordered.starts(10) == plain.starts(10)  # past the run's length: drawn as usual


def test_curriculum_and_selection_resume_exactly(scored, tmp_path):
    cfg = config(scored / "data", steps=6, checkpoint_interval=3, token_selection="rho1", curriculum="value")
    straight = train(from_preset("tiny", vocab_size=300), cfg, tmp_path / "straight", progress=False, peak=PEAK)
    torch.manual_seed(cfg.seed)
    model = DensaModel(from_preset("tiny", vocab_size=300))
    calls = {"n": 0}

    def crash(module, args, output):
        calls["n"] += module.training
        if calls["n"] > 4:
            raise KeyboardInterrupt
    handle = model.register_forward_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        train(from_preset("tiny", vocab_size=300), cfg, tmp_path / "resumed", progress=False, peak=PEAK, model=model)
    handle.remove()
    resumed = train(from_preset("tiny", vocab_size=300), cfg, tmp_path / "resumed", resume=True, progress=False,
                    peak=PEAK)
    assert resumed.losses == straight.losses[3:] and resumed.flops == straight.flops


# --------------------------------------------------------------------------- noise


def test_noise_generator_is_seeded_and_keeps_the_clean_text():
    docs = [p for p in next(corpus_texts("tinyshakespeare"))[:100_000].split("\n\n") if p.strip()][:300]
    cfg = NoiseConfig(rate=0.3, seed=5)
    noisy = inject_noise(docs, cfg)
    assert noisy == inject_noise(docs, NoiseConfig(rate=0.3, seed=5))
    assert noisy != inject_noise(docs, NoiseConfig(rate=0.3, seed=6))
    assert inject_noise(docs, NoiseConfig(rate=0.0)) == docs
    assert 0.2 < noise_share(docs, noisy) < 0.35
    joined = "\n".join(noisy)
    assert any(line.format(page=1)[:20] in joined for line in BOILERPLATE) and "0x" in joined
    for clean, dirty in zip(docs, noisy, strict=True):  # every clean line survives, in order
        rest = iter(dirty.splitlines())
        assert all(any(line == other for other in rest) for line in clean.splitlines())
    for clean, (dirty, spans) in zip(docs, inject_noise_with_spans(docs, cfg), strict=True):  # spans = the noise
        cuts = [0] + [x for span in spans for x in span] + [len(dirty)]  # clean, noise, clean, ..., clean
        kept = "".join(dirty[cuts[i]:cuts[i + 1]] for i in range(0, len(cuts), 2))
        assert kept in (clean, clean + "\n") and all(dirty[e - 1] == "\n" for _, e in spans)
    shares = [noise_share([c], [d]) for c, d in zip(docs, noisy, strict=True)]
    assert min(shares) < 0.05 and max(shares) > 0.4  # documents differ in value
    with pytest.raises(ValueError, match="noise rate"):
        NoiseConfig(rate=1.0)


# --------------------------------------------------------------------------- the study


def test_flops_to_reach_and_interval():
    points = [(1.0, 5.0), (2.0, 4.0), (3.0, 3.0)]
    assert first_crossing(points, 3.5) == pytest.approx(2.5)
    assert first_crossing(points, 6.0) == 1.0 and first_crossing(points, 2.9) is None
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 * 1 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2)
    assert mean_ci([1.5]) == (1.5, None, None)
    curves = {c: {"uniform": [[(1.0, 5.0), (2.0, 4.0)]] * 2,
                  "selective": [[(1.5, 4.5), (2.0, 3.5)], [(1.5, 3.9), (2.0, 3.8)]],
                  "curriculum": [[(1.5, 4.5), (2.0, 4.2)]] * 2} for c in study.CORPORA}
    out = study.summarise(curves, budget=2.0, offsets={"noisy": 0.5, "clean": 0.5}, seeds=2)
    assert out["noisy_selective_flops_to_baseline_ratio"] == pytest.approx((1.75 + 1.5) / 2 / 2.0)
    assert out["noisy_selective_flops_to_baseline_ratio_training_only"] == pytest.approx((1.25 + 1.0) / 2 / 2.0)
    assert out["noisy_selective_seeds_reached"] == 2 and out["noisy_selective_val_loss_delta"] == pytest.approx(-0.35)
    assert out["clean_curriculum_seeds_reached"] == 0 and out["clean_curriculum_flops_to_baseline_ratio"] is None
    assert out["clean_curriculum_val_loss_delta"] == pytest.approx(0.2) and out["clean_reference_flops_share"] == 0.25


def test_study_smoke(tmp_path):
    size = study.StudySize(docs_fraction=0.01, paragraphs_per_doc=1, vocab_size=300, hidden_size=32,
                           reference_hidden_size=16, steps=12,
                           reference_steps=2, batch_size=4, context=32, eval_points=2, eval_batches=1, seeds=2)
    (tmp_path / "out").mkdir()
    result = study.run_study(size, tmp_path / "out", tmp_path / "work", progress=False, peak=PEAK)
    for corpus in study.CORPORA:
        for method in ("selective", "curriculum"):
            key = f"{corpus}_{method}"
            assert result[f"{key}_steps"] < result[f"{corpus}_uniform_steps"] == 12  # the reference is paid for
            assert 0 <= result[f"{key}_seeds_reached"] <= 2
            ratio = result[f"{key}_flops_to_baseline_ratio"]
            assert ratio is None or (result[f"{key}_flops_to_baseline_ratio_ci_low"] <= ratio
                                     <= result[f"{key}_flops_to_baseline_ratio_ci_high"])
            free = result[f"{key}_flops_to_baseline_ratio_training_only"]
            assert (free is None) == (ratio is None)
            assert free is None or free == pytest.approx(ratio - result[f"{corpus}_reference_flops_share"], abs=1e-5)
            assert result[f"{key}_val_loss_delta_ci_low"] <= result[f"{key}_val_loss_delta"]
        assert 0 < result[f"{corpus}_reference_flops_share"] < 1
    assert 0.1 < result["noisy_noise_char_share"] < 0.4
    for key in ("noisy_selective_kept_share_noise_tokens", "noisy_selective_kept_share_clean_tokens",
                "noisy_curriculum_noise_token_share_first_half", "noisy_curriculum_noise_token_share_second_half"):
        assert 0 <= result[key] <= 1, key
    assert -1 <= result["noisy_document_value_vs_noise_spearman"] <= 1
    assert (tmp_path / "out" / "high-value-tokens.png").stat().st_size > 10_000
    assert "| noisy | selective |" in (tmp_path / "out" / "high-value-tokens.md").read_text()
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())["curves"]
    assert len(curves["clean"]["uniform"]) == 2 and curves["clean"]["uniform"][0][-1][0] == result["budget_flops"]
    args = argparse.Namespace(quick=True, seeds=None, overrides=["steps=x"], config=None)
    with pytest.raises(Exception, match="steps=x"):
        study.size_from_args(args)
