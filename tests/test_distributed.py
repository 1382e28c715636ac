"""The trainer under torchrun: 2 gloo processes on CPU (DDP and FSDP2) against one process on the same global batches.

One 2-process session (tests/distributed_worker.py, started once per module) runs everything distributed; this
process runs the single-process references and the 1-process resume of a 2-process checkpoint.
What is checked and why: docs/training.md, 'Distributed: torchrun, DDP and FSDP2'.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import prepared_shakespeare

from densa.config import from_preset
from densa.data.pretrain import PretrainLoader
from densa.train import distributed
from densa.train.loop import METRICS, train
from densa.train.state import STATE_FILE

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import PEAK, VARIANTS, config  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
EXACT = 1e-5  # float reduction order only: measured differences are <= 7e-7
# the MoE budget controller proposes its ZC bias per forward from the tokens it saw (a quantile) and averages the
# proposals over micro-batches and ranks, so 2 ranks of half a batch propose slightly differently from one process
# with all of it; measured up to 2e-3 after 4 steps, and <= 7e-7 with the controller held fixed
BUDGET = 1e-2


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    data = prepared_shakespeare(root, 30_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = {}
    for name, (preset, overrides) in VARIANTS.items():
        res = train(from_preset(preset, vocab_size=300, **overrides), config(str(data), tensorboard=True),
                    root / f"single-{name}", progress=False, peak=PEAK)
        single[name] = {"losses": res.losses, "val_loss": res.val_loss}
    torch.set_num_threads(threads)
    shutil.copytree(root / "single-tiny", root / "single-tiny-cut")  # the worker resumes it from step 2
    shutil.rmtree(root / "single-tiny-cut" / "checkpoints" / "step-4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(WORKER), str(data), str(root)]  # forks 2 ranks (torchrun works too, only slower)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"root": root, "data": data, "single": single, "dist": json.loads((root / "distributed.json").read_text()),
            "cli_out": proc.stdout}


# --------------------------------------------------------------------------- without processes


def test_loader_ranks_split_the_single_process_batch(tmp_path):
    prepared_shakespeare(tmp_path, 8_000)
    for mode in ("random", "sequential"):
        whole = PretrainLoader(tmp_path / "data", "train", 6, 16, seed=3, mode=mode)
        parts = [PretrainLoader(tmp_path / "data", "train", 6, 16, seed=3, mode=mode, rank=r, world_size=3)
                 for r in range(3)]
        for i in range(3):
            assert torch.equal(torch.cat([p.batch(i) for p in parts]), whole.batch(i))
    with pytest.raises(ValueError, match=r"batch_size=6 is the global batch and must be divisible by .* \(4\)"):
        PretrainLoader(tmp_path / "data", "train", 6, 16, world_size=4)


def test_no_torchrun_means_one_plain_process():
    for mode in ("auto", "ddp", "fsdp2", "none"):
        assert distributed.setup(mode) == distributed.Dist()  # a ddp / fsdp2 recipe still runs with plain `densa train`


# --------------------------------------------------------------------------- 2 processes against 1


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_processes_match_one(session, mode, name):
    ours, ref = session["dist"]["runs"][f"{mode}-{name}"], session["single"][name]
    tol = BUDGET if name == "tiny-moe" else EXACT
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), atol=tol, rtol=0)
    assert ours["val_loss"] == pytest.approx(ref["val_loss"], abs=tol)
    records = [json.loads(line) for line in (session["root"] / f"{mode}-{name}" / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 alone wrote, once per step
    run = json.loads((session["root"] / f"{mode}-{name}" / "run.json").read_text())
    assert (run["world_size"], run["distributed"]) == (2, mode)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_moe_routing_state_identical_on_every_rank(session, mode):
    """update_routing() all-reduces the routing counts, so the balance and budget biases never diverge (DDP runs
    with forward_sync_buffers=False, so nothing would paper over a drift)."""
    for name in ("tiny-moe", "tiny-moe-fixed-budget"):
        rank0, rank1 = session["dist"]["runs"][f"{mode}-{name}"]["routing_per_rank"]
        assert rank0 == rank1
        assert any(b != 0 for layer in rank0 for b in layer)  # the biases did move


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_fused_expert_gradients_equal_single_process(session, mode):
    """With rank-divergent routing, the fused 3-D expert weights' gradients under DDP and FSDP2 equal the
    single-process gradients of the same global batch (docs/design-notes.md, 'Distributed pitfalls').
    `split-routing-moe`: rank 1's tokens all go to zero-computation experts, so it computes no expert at all."""
    model = session["dist"]["grads"][f"{mode}-model"]
    assert model["max_abs_diff"] < 1e-6 and model["max_abs_diff_experts"] < 1e-8 < model["expert_grad_max"]
    split = session["dist"]["grads"][f"{mode}-split-routing-moe"]
    assert split["max_abs_diff"] < 1e-8 < split["expert_grad_max"]
    (rank0,), (rank1,) = split["usage_per_rank"]
    assert sum(rank0) > 0 and sum(rank1) == 0


def test_checkpoints_move_between_world_sizes(session, tmp_path):
    root, runs = session["root"], session["dist"]["runs"]
    # 1 process -> 2: the worker resumed the single-process run's step-2 checkpoint under FSDP2
    torch.testing.assert_close(torch.tensor(runs["fsdp2-resumed-from-1-process"]["losses"]),
                               torch.tensor(session["single"]["tiny"]["losses"][2:]), atol=EXACT, rtol=0)
    # 2 processes -> 1: resume the FSDP2 runs' step-2 checkpoints here and match their uninterrupted steps 3-4
    torch.set_num_threads(1)
    for name in ("tiny", "tiny-moe-fixed-budget"):
        cut = tmp_path / name
        shutil.copytree(root / f"fsdp2-{name}", cut)
        shutil.rmtree(cut / "checkpoints" / "step-4")
        preset, overrides = VARIANTS[name]
        res = train(from_preset(preset, vocab_size=300, **overrides), config(str(session["data"])), cut,
                    resume=True, progress=False, peak=PEAK)
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(runs[f"fsdp2-{name}"]["losses"][2:]),
                                   atol=EXACT, rtol=0)
    # the same checkpoint format whatever wrote it: weights and optimizer states keyed by parameter name
    one, two = root / "single-tiny-moe/checkpoints/step-4", root / "fsdp2-tiny-moe/checkpoints/step-4"
    w1, w2 = (safetensors.torch.load_file(p / "model.safetensors") for p in (one, two))
    assert w1.keys() == w2.keys()
    s1, s2 = (torch.load(p / STATE_FILE, weights_only=False) for p in (one, two))
    assert [o["state"].keys() for o in s1["optimizers"]] == [o["state"].keys() for o in s2["optimizers"]]
    assert s2["data"] == s1["data"]


def test_nan_on_one_rank_skips_the_step_on_all(session):
    run = session["dist"]["runs"]["fsdp2-nan-on-rank-1"]
    rank0, rank1 = run["losses_per_rank"]
    assert rank0 == rank1 and rank0[1] == "nan" and "nan" not in (rank0[0], rank0[2])
    assert run["skipped_per_rank"] == [1, 1]
    records = [json.loads(line) for line in (session["root"] / "fsdp2-nan" / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [2]


def test_densa_train_command_under_torchrun(session):
    run = session["root"] / "cli-fsdp2"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert (run / "checkpoints" / "step-2" / "model.safetensors").is_file()
    assert session["cli_out"].count("trained to step 2") == 1  # rank 0 reports


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_without_tensorboard_only_jsonl(session):
    run = session["root"] / "single-tiny"  # trained with tensorboard=True
    assert not (run / "tb").exists() and (run / METRICS).is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_written(session):
    assert list((session["root"] / "single-tiny" / "tb").glob("events.out.tfevents.*"))
