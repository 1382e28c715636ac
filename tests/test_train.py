"""`densa train`: recipe config, the loop, crash-safe checkpoints, exact resume, NaN handling."""

import json
from pathlib import Path

import pytest
import torch
from conftest import prepared_shakespeare

from densa.checkpoint import load_model
from densa.cli import main as cli_main
from densa.config import ConfigError, from_preset
from densa.model.model import DensaModel
from densa.resolve import resolve
from densa.train import state as state_module
from densa.train.config import TrainConfig, load_recipe
from densa.train.loop import MicroBatch, train, train_step
from densa.train.optim import build_optimizers, lr_multiplier
from densa.train.state import STATE_FILE, latest_checkpoint, list_checkpoints

RECIPES = Path(__file__).parents[1] / "recipes"
PEAK = 1e11  # a fixed MFU denominator: tests do not benchmark the machine


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_shakespeare(tmp_path_factory.mktemp("train-data"), 60_000)


def config(data: Path, **changes) -> TrainConfig:
    base = dict(data=str(data), batch_size=2, context=32, steps=6, warmup_steps=2, log_interval=1, eval_interval=3,
                eval_batches=1, checkpoint_interval=3, keep_last=5)
    return TrainConfig(**{**base, **changes})


def tiny(preset: str = "tiny", **overrides):
    return from_preset(preset, vocab_size=300, **overrides)


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


# --------------------------------------------------------------------------- config


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"train.lr=0.0: must be in \(0, 10\]"):
        TrainConfig(data="d", lr=0.0)
    with pytest.raises(ConfigError, match="train.schedule='linear': choose from cosine, wsd"):
        TrainConfig(data="d", schedule="linear")
    with pytest.raises(ConfigError, match="train.batch_size=0"):
        TrainConfig(data="d", batch_size=0)
    with pytest.raises(ConfigError, match="train.data is not set"):
        TrainConfig()


def test_load_recipe_with_overrides(tmp_path):
    model_cfg, cfg = load_recipe(RECIPES / "tiny-train.yaml", ["train.lr=0.01", "model.hidden_size=32",
                                                                "steps=7", "train.bf16=true"])
    assert (cfg.lr, cfg.steps, cfg.bf16, model_cfg.hidden_size, model_cfg.vocab_size) == (0.01, 7, True, 32, 512)
    with pytest.raises(ConfigError, match="unknown train key.*valid keys: data, batch_size"):
        load_recipe(RECIPES / "tiny-train.yaml", ["train.learning_rate=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny}\ntrain: {data: d, epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown train key\(s\) \['epochs'\]"):
        load_recipe(bad)
    for recipe in RECIPES.glob("*-train.yaml"):
        load_recipe(recipe)


def test_schedules_and_parameter_groups():
    cfg = TrainConfig(data="d", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1) and lr_multiplier(9, cfg) == 1.0
    assert lr_multiplier(99, cfg) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(data="d", steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, wsd) == 1.0 and lr_multiplier(89, wsd) == pytest.approx(0.5)
    assert lr_multiplier(99, wsd) == 0.0
    model = DensaModel(tiny("tiny-moe"))
    adamw, muon = build_optimizers(model, TrainConfig(data="d", optimizer="muon"))
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.embed_tokens.weight) not in muon_params and id(model.layers[0].mlp.gate.weight) not in muon_params
    decay, plain = adamw.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    plain_names = [names[id(p)] for p in plain["params"]]
    assert all(n.endswith(("norm.weight", "bias", "qk_scale", ".alpha", ".delta", ".omega", ".gamma", ".beta", ".theta",
                           "gate.weight")) for n in plain_names), plain_names
    assert id(model.layers[0].mlp.experts.gate_up_proj) in {id(p) for p in decay["params"]}
    n = sum(len(g["params"]) for opt in (adamw, muon) for g in opt.param_groups)
    assert n == len(list(model.parameters()))


# --------------------------------------------------------------------------- one step, called alone


def test_train_step_alone_learns_and_skips_non_finite():
    """train_step on a user's own model, batch and optimizer: the loss falls, gradients reach every parameter, a
    NaN loss changes nothing."""
    torch.manual_seed(0)
    model = DensaModel(tiny("tiny-moe")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 300, (2, 17))  # (B, T+1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = train_step(model, [MicroBatch(batch[:1]), MicroBatch(batch[1:])], [opt])  # 2 micro-batches
    assert not first.skipped and first.grad_norm > 0 and first.routing  # MoE: update_routing() ran
    assert all(p.grad is None for p in model.parameters())  # dropped after the update
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before), set(before) - set(moved)  # every parameter got a gradient and an update
    losses = [train_step(model, [MicroBatch(batch)], [opt]).loss for _ in range(8)]
    assert losses[-1] < first.loss - 0.5 and losses == sorted(losses, reverse=True)

    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = model.register_forward_hook(lambda module, args, out: setattr(out, "loss", out.loss * float("nan")))
    bad = train_step(model, [MicroBatch(batch)], [opt])
    handle.remove()
    assert bad.skipped and bad.loss != bad.loss and bad.grad_norm != bad.grad_norm  # NaN, no norm taken
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_train_step_rho1_with_every_token_is_plain_cross_entropy():
    """A micro-batch with reference losses trains Rho-1; keeping every token it is the plain objective."""
    torch.manual_seed(0)
    model = DensaModel(tiny()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 300, (2, 17))
    plain = train_step(model, [MicroBatch(batch)], [opt], grad_clip=0.0)
    torch.manual_seed(0)
    model = DensaModel(tiny()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    every = train_step(model, [MicroBatch(batch, torch.zeros(2, 16))], [opt], grad_clip=0.0, select_fraction=1.0)
    assert every.loss == pytest.approx(plain.loss, abs=1e-6) and every.ce_loss == plain.ce_loss
    half = train_step(model, [MicroBatch(batch, torch.zeros(2, 16))], [opt], select_fraction=0.5)
    assert half.loss > half.ce_loss  # the top half by excess loss: above the all-token mean


# --------------------------------------------------------------------------- the loop and checkpoints


def test_train_writes_metrics_and_loadable_checkpoints(data, tmp_path):
    result = train(tiny(), config(data, steps=6, checkpoint_interval=2, keep_last=2), tmp_path / "run",
                   progress=False, peak=PEAK)
    assert result.step == 6 and result.skipped_steps == 0 and result.val_bpb > 0 and result.tokens_per_s > 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-4", "step-6"]  # keep_last=2
    assert (ckpts / "latest").read_text().strip() == "step-6"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped_steps"} <= set(train_records[0])
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["val_bpb"] == pytest.approx(result.val_bpb)
    model = load_model(ckpts / "step-6")
    resolved = resolve(str(ckpts / "step-6"))
    assert resolved.tokenizer is not None and len(resolved.tokenizer) == 300
    torch.testing.assert_close(model.embed_tokens.weight, resolved.model.embed_tokens.weight)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(), config(data), tmp_path / "run", progress=False, peak=PEAK)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_resume_continues_exactly(data, tmp_path, preset):
    cfg = config(data, steps=6, checkpoint_interval=3, grad_accum=2)
    straight = train(tiny(preset), cfg, tmp_path / "straight", progress=False, peak=PEAK)

    # interrupted: an error in step 5's forward (after the step-3 checkpoint), then --resume
    torch.manual_seed(cfg.seed)
    model = DensaModel(tiny(preset))
    calls = {"n": 0}

    def crash(module, args, output):
        calls["n"] += module.training
        if calls["n"] > 4 * cfg.grad_accum:
            raise KeyboardInterrupt
    handle = model.register_forward_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(preset), cfg, tmp_path / "resumed", progress=False, peak=PEAK, model=model)
    handle.remove()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-3"
    resumed = train(tiny(preset), cfg, tmp_path / "resumed", resume=True, progress=False, peak=PEAK)
    assert resumed.losses == straight.losses[3:]
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "resumed")), torch.tensor(straight.losses),
                               atol=0, rtol=0)
    a, b = load_model(straight.checkpoint), load_model(resumed.checkpoint)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    if preset == "tiny-moe":
        records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
        assert any(k.startswith("routing/layers.0.") for k in records[0])


def test_compiled_training_matches_eager_and_keeps_checkpoint_names(data, tmp_path, monkeypatch):
    """`train.compile: on` compiles the model's forward in place (aot_eager here: the same tracing and
    functionalisation as inductor, no C++ build): the losses follow the eager run's, the forward really ran
    compiled, and the checkpoint loads into a plain model under the same names."""
    import densa.train.loop as loop

    monkeypatch.setattr(loop, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()  # no graphs from other tests: a second shape would make dynamo mark dimensions dynamic
    cfg = config(data, steps=2, checkpoint_interval=2, eval_interval=2)
    eager = train(tiny(), cfg, tmp_path / "eager", progress=False, peak=PEAK)
    torch.manual_seed(cfg.seed)
    model = DensaModel(tiny())
    compiled = train(tiny(), config(data, steps=2, checkpoint_interval=2, eval_interval=2, compile="on"),
                     tmp_path / "compiled", progress=False, peak=PEAK, model=model)
    assert model._compiled_call_impl is not None  # nn.Module.compile ran
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), atol=1e-4, rtol=1e-4)
    a, b = load_model(eager.checkpoint), load_model(compiled.checkpoint)
    assert list(a.state_dict()) == list(b.state_dict())
    with pytest.raises(ConfigError, match="compile"):
        config(data, compile="yes")
    torch._dynamo.reset()


def test_muon_wsd_bf16_accumulation_runs(data, tmp_path):
    cfg = config(data, steps=3, optimizer="muon", schedule="wsd", bf16=True, grad_accum=2, sampling="sequential")
    result = train(tiny("tiny-moe"), cfg, tmp_path / "run", progress=False, peak=PEAK)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_nan_steps_are_skipped_then_stop(data, tmp_path):
    torch.manual_seed(0)
    model = DensaModel(tiny())
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += module.training
        if module.training and calls["n"] in (2, 4, 5, 6):  # step 2 is a lone NaN; steps 4.. go on failing
            output.loss = output.loss * float("nan")
        return output
    model.register_forward_hook(poison)
    cfg = config(data, steps=10, checkpoint_interval=1, max_nan_steps=3)
    with pytest.raises(RuntimeError, match="NaN/inf for 3 consecutive steps .*Last good checkpoint: .*step-3"):
        train(tiny(), cfg, tmp_path / "run", progress=False, peak=PEAK, model=model)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [2, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 3]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-3"
    load_model(tmp_path / "run" / "checkpoints" / "step-3")


def test_failed_save_keeps_previous_checkpoint(data, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: die half-way through writing train_state.pt
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(state_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(tiny(), config(data, steps=6, checkpoint_interval=3), tmp_path / "run", progress=False, peak=PEAK)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-3"]  # no half-written step-6 or temp folder
    assert latest_checkpoint(ckpts).name == "step-3"
    load_model(ckpts / "step-3")
    monkeypatch.setattr(state_module.torch, "save", real_save)
    result = train(tiny(), config(data, steps=6, checkpoint_interval=3), tmp_path / "run", resume=True,
                   progress=False, peak=PEAK)
    assert result.step == 6 and latest_checkpoint(ckpts).name == "step-6"


def test_torn_metrics_line_is_dropped_on_resume(data, tmp_path):
    """A kill mid-write leaves half a JSON record as the last line: resume drops it with a warning and goes on."""
    run = tmp_path / "run"
    train(tiny(), config(data, steps=3), run, progress=False, peak=PEAK)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"kind": "train", "step": 4, "loss": 5.6')  # no newline: torn
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 unreadable line\(s\) \(line 5\)"):
        result = train(tiny(), config(data, steps=6), run, resume=True, progress=False, peak=PEAK)
    assert result.step == 6
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))


def test_fresh_run_starts_a_fresh_metrics_file(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n{"kind": "tr')  # never checkpointed
    train(tiny(), config(data, steps=1), run, progress=False, peak=PEAK)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    assert losses(run) != [9.0]


@pytest.mark.parametrize("damaged", ["model.safetensors", STATE_FILE])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(data, tmp_path, damaged):
    """Truncate a file of the newest checkpoint (what a full disk or a cut copy leaves): --resume warns, resumes
    from the newest intact checkpoint, and continues exactly; stale temporaries of interrupted saves go."""
    run = tmp_path / "run"
    straight = train(tiny(), config(data, steps=6), run, progress=False, peak=PEAK)
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-3", "step-6"]
    path = ckpts / "step-6" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    stale = [ckpts / ".step-7.k3j2", ckpts / "..step-7.k3j2.x9"]  # what kill -9 during a save leaves
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    (ckpts / "notes").mkdir()  # not densa's: kept
    with pytest.warns(UserWarning, match=rf"resuming from .*step-3 \(step 3\); skipped damaged checkpoint\(s\): "
                                         rf".*step-6/{damaged}"):
        resumed = train(tiny(), config(data, steps=6), run, resume=True, progress=False, peak=PEAK)
    assert resumed.losses == straight.losses[3:]  # bit-exact from step 3
    assert latest_checkpoint(ckpts).name == "step-6"
    load_model(ckpts / "step-6")  # rewritten whole
    assert not any(folder.exists() for folder in stale) and (ckpts / "notes").is_dir()

    for step in ("step-3", "step-6"):  # nothing intact: one line naming each damaged file
        (ckpts / step / STATE_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no intact checkpoint to resume from: .*step-6/train_state.pt.*"
                                                r"step-3/train_state.pt"):
        train(tiny(), config(data, steps=9), run, resume=True, progress=False, peak=PEAK)


def test_unwritable_out_and_vocab_errors(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="--out .*file/run: cannot write there"):
        train(tiny(), config(data), blocker / "run", progress=False, peak=PEAK)
    with pytest.raises(ValueError, match="vocab_size >= 300"):
        train(from_preset("tiny"), config(data), tmp_path / "run", progress=False, peak=PEAK)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(tiny(), config(data), tmp_path / "fresh", resume=True, progress=False, peak=PEAK)


def test_cli_train(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DENSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("densa.train.peak.measure_matmul_flops", lambda dtype: 1e11)
    argv = ["train", "--config", str(RECIPES / "tiny-train.yaml"), "--out", str(tmp_path / "run"), "--no-progress",
            "--set", f"train.data={data}", "--set", "model.vocab_size=300", "--set", "train.steps=2",
            "--set", "train.context=32"]
    assert cli_main(argv) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert cli_main([*argv[:-4], "--set", "train.steps=3", "--set", "train.context=32", "--resume"]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert cli_main([*argv, "--set", "train.warmup_steps=-1"]) == 1
    assert "train.warmup_steps=-1" in capsys.readouterr().err


KILL_SCRIPT = """
import sys, torch
from densa.config import from_preset
from densa.train.config import TrainConfig
from densa.train.loop import train
torch.set_num_threads(1)
cfg = TrainConfig(data=sys.argv[1], batch_size=2, context=32, steps=10_000, warmup_steps=2, log_interval=1,
                  eval_interval=10_000, eval_batches=1, checkpoint_interval=1, keep_last=2)
train(from_preset("tiny", vocab_size=300), cfg, sys.argv[2], progress=False, peak=1e11)
"""


def test_kill_9_during_training_leaves_a_loadable_checkpoint(data, tmp_path):
    """SIGKILL a run that saves every step (so the kill most likely lands inside a save), then resume it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(data), str(run)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list_checkpoints(run / "checkpoints")) < 2:
            time.sleep(0.05)
        time.sleep(0.13)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = latest_checkpoint(run / "checkpoints")
    assert latest is not None
    load_model(latest)
    step = int(latest.name.removeprefix("step-"))
    result = train(tiny(), config(data, steps=step + 1, checkpoint_interval=1, keep_last=2), run, resume=True,
                   progress=False, peak=PEAK)
    assert result.step == step + 1


def test_bench_train_keys():
    from densa.bench import train as bench_train

    result = bench_train.run_cases(from_preset("tiny"), batch_size=2, context=32, steps=1, warmup=1, peak=PEAK)
    for kind in ("densa", "dense", "hf"):
        assert result[f"{kind}_tokens_per_s"] > 0 and result[f"{kind}_mfu"] > 0
    assert result["hf_params"] == result["dense_params"]
    assert result["ratio_tokens_per_s"] > 0 and result["dense_vs_hf"] > 0


def test_bench_train_step_takes_a_compiled_forward():
    """A torch.compile'd module refuses bool()/len() (dynamo's OptimizedModule), so the step must not test its
    truth value; the eager backend keeps the trace cheap."""
    from densa.bench import train as bench_train
    from densa.train.config import TrainConfig
    from densa.train.optim import build_optimizers

    model = DensaModel(from_preset("tiny", num_hidden_layers=1)).train()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(TypeError, match="len"):
        bool(compiled)
    batch = torch.randint(0, 256, (2, 17))
    optimizers = build_optimizers(model, TrainConfig(data="(bench)", lr=1e-3))
    assert bench_train.step_seconds(model, optimizers, batch, False, compiled) > 0
