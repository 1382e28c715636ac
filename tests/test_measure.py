"""The measurement core (densa/measure.py): FLOPs at the experts used, one windowing rule, one byte accounting — and
every entry point (quickstart, studies, eval, serve metering, training validation) gets the same figures from it."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from densa.config import from_preset
from densa.counting import ffn_flops_per_token, flops_per_token
from densa.data.tokenizer import train_tokenizer
from densa.measure import (
    ExpertMeter,
    bits_per_byte,
    forward_flops_per_token,
    heldout_bits_per_byte,
    text_windows,
    token_byte_lengths,
)
from densa.model.model import DensaModel

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("Café au lait — naïve 東京 ☕. " + "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. ") * 6


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], 300)


def moe_model(vocab: int = 300) -> DensaModel:
    torch.manual_seed(0)
    return DensaModel(from_preset("tiny-moe", vocab_size=vocab)).eval()


def test_flops_at_experts_used():
    moe = from_preset("tiny-moe")
    L = moe.num_hidden_layers
    assert forward_flops_per_token(moe, 64) == flops_per_token(moe, 64).total  # nominal budget
    nominal = [moe.target_active_experts] * L
    assert forward_flops_per_token(moe, 64, nominal) == pytest.approx(flops_per_token(moe, 64).total)
    fewer = forward_flops_per_token(moe, 64, [1.0] * L)
    per_expert = 6 * moe.hidden_size * moe.expert_intermediate_size
    assert fewer == pytest.approx(flops_per_token(moe, 64).total - L * (moe.target_active_experts - 1) * per_expert)
    topk = from_preset("tiny", ffn="topk_moe", num_experts=8, num_experts_per_tok=2)
    # top-k always runs K experts: the nominal figure is K (moefy's old copy subtracted the dynamic target here)
    assert forward_flops_per_token(topk, 64, [2.0] * L) == pytest.approx(flops_per_token(topk, 64).total)
    assert ffn_flops_per_token(topk) == ffn_flops_per_token(topk, 2)
    dense = from_preset("tiny")
    assert forward_flops_per_token(dense, 64, [99.0] * L) == flops_per_token(dense, 64).total
    with pytest.raises(ValueError, match="layers"):
        forward_flops_per_token(moe, 64, [1.0])


def test_expert_meter_leaves_padding_out():
    meter = ExpertMeter()
    used_LBT = torch.tensor([[[1, 2, 3], [4, 4, 4]], [[0, 0, 6], [2, 2, 2]]])  # (2 layers, B=2, T=3)
    mask_BT = torch.tensor([[0, 1, 1], [1, 1, 1]])
    meter.add(used_LBT, mask_BT)
    assert meter.tokens == 5
    assert meter.per_layer() == pytest.approx([(2 + 3 + 12) / 5, (6 + 6) / 5])
    meter.add(None)  # a dense FFN's forward adds nothing
    assert ExpertMeter().per_layer() is None


def test_token_bytes_add_up_to_the_text(tokenizer):
    table = token_byte_lengths(tokenizer, 300)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert int(table[ids].sum()) == len(TEXT.encode("utf-8"))  # multi-byte characters split across tokens included
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert table[eos] == 0


def test_windows_predict_every_token_but_the_first_once():
    ids = list(range(23))
    windows = text_windows(ids, 5)
    predicted = [int(t) for w in windows for t in w[1:]]
    assert predicted == ids[1:]
    assert all(len(w) <= 6 for w in windows)
    with pytest.raises(ValueError):
        text_windows([1], 5)


def test_bits_per_byte_matches_a_plain_loop(tokenizer):
    """Reference: each window alone, token by token, Σ −log2 p over Σ bytes of the predicted tokens."""
    model = moe_model()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    score = heldout_bits_per_byte(model, tokenizer, TEXT, window=32, batch=3)
    table = token_byte_lengths(tokenizer, 300)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for w in text_windows(ids, 32):
            logp = F.log_softmax(model(w[None, :-1]).logits[0].double(), -1)
            nats -= float(logp.gather(1, w[1:, None]).sum())
            n_bytes += int(table[w[1:]].sum())
    assert score.bpb == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert score.tokens == len(ids) - 1 and score.bytes == n_bytes
    assert score.ffn_experts is not None and len(score.ffn_experts) == model.config.num_hidden_layers
    assert score.flops_per_token == pytest.approx(forward_flops_per_token(model.config, 32, score.ffn_experts))


def test_every_entry_point_gets_the_same_figures(tokenizer, tmp_path):
    """One model, one text: the quickstart's and moefy study's held-out scoring, the iso-FLOP study's spent FLOPs,
    densa eval's FLOPs at the experts used, and serve's per-request metering agree with the core."""
    from densa.eval.measure import moe_spent_flops_per_token
    from densa.serve.engine import Engine, Request, SamplingParams
    from densa.serve.metrics import ServerMetrics
    from densa.study.iso_flop import spent_training_flops_per_token
    from densa.study.moefy import score as moefy_score

    model = moe_model()
    cfg = model.config
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    W = 48
    core = heldout_bits_per_byte(model, tokenizer, TEXT, window=W)

    # the moefy study (its token lists through the same windows)
    row = moefy_score(model, tokenizer, {"text": ids}, W)
    assert row["bpb"] == pytest.approx(core.bpb, rel=1e-6)
    assert row["flops_per_token"] == pytest.approx(core.flops_per_token, rel=1e-6)

    # the iso-FLOP study: training FLOPs from logged per-layer experts are 3x the core's forward figure
    log = [{"kind": "train", **{f"routing/layers.{i}.mean_ffn_experts": e for i, e in enumerate(core.ffn_experts)}}]
    assert spent_training_flops_per_token(cfg, W, log) == pytest.approx(3 * core.flops_per_token)

    # one window of W tokens: densa eval's spent FLOPs and serve's metering for that prompt
    prompt = ids[:W]
    single = bits_per_byte(model, [torch.tensor(ids[: W + 1])], token_byte_lengths(tokenizer, cfg.vocab_size))

    class _EvalModel:  # what densa.eval.measure needs of an in-process model
        def __init__(self):
            self.model, self.tokenizer = model, tokenizer

    text_of_prompt = tokenizer.decode(prompt)
    assert tokenizer.encode(text_of_prompt, add_special_tokens=False) == prompt
    spent = moe_spent_flops_per_token(_EvalModel(), [text_of_prompt], max_tokens=W)
    assert spent == pytest.approx(single.flops_per_token, rel=1e-6)

    engine = Engine(model, ServerMetrics(), max_batch=2, max_queue=2)
    done = threading.Event()
    request = Request(prompt, SamplingParams(max_tokens=0, temperature=0.0),
                      lambda ev: done.set() if ev.kind != "delta" else None, 60.0, lambda t: "")
    engine.start()
    try:
        engine.submit(request)
        assert done.wait(30)
    finally:
        engine.stop()
    metered = engine.usage(request)["x_densa"]
    assert metered["tokens_processed"] == W
    assert metered["flops_per_token"] == pytest.approx(single.flops_per_token, rel=1e-6)


def test_training_validation_uses_the_core(tmp_path):
    """`densa train`'s validation bits/byte (distributed-aware loss, core byte accounting) equals the core's own."""
    from conftest import prepared_shakespeare

    from densa.data.pretrain import eval_batches
    from densa.data.tokenizer import load_tokenizer
    from densa.measure import predicted_bytes
    from densa.train import distributed
    from densa.train.loop import validate

    data = prepared_shakespeare(tmp_path, 6000)
    model = moe_model()
    batches = eval_batches(data, 4, 32, 3)  # (4, 33) windows of the validation split
    table = token_byte_lengths(load_tokenizer(data / "tokenizer"), 300)
    val = validate(model, batches, sum(predicted_bytes(b, table) for b in batches), False, distributed.Dist())
    core = bits_per_byte(model, torch.cat(batches), table)
    assert val.bpb == pytest.approx(core.bpb, rel=1e-5)
    assert val.tokens == core.tokens
