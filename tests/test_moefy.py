"""`densa moefy`: a dense Llama → densa dynamic MoE that is exact with every expert active, routes within its
budget, and stays an ordinary densa model (resolver, inspect-routing, HF export)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from densa.cli import main
from densa.config import from_preset
from densa.data.tokenizer import train_tokenizer
from densa.model.model import DensaModel
from densa.moefy.calibrate import corpus_text, encode
from densa.moefy.fit import fit_router, group_norms, topk_recall
from densa.moefy.split import cluster_split, coactivation_score, random_split
from densa.resolve import resolve

CORPUS = "tinyshakespeare"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random Llama-architecture HF model (transformers' own class) with a byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("llama") / "llama"
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    train_tokenizer([corpus_text(CORPUS, "train", 200_000)], vocab_size=300).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def converted(llama_dir, tmp_path_factory):
    """The CLI's conversion at budget 0.5 (8 experts of 16 neurons), and its report."""
    out = tmp_path_factory.mktemp("moefy") / "moe"
    assert main(["moefy", str(llama_dir), "--experts", "8", "--budget", "0.5", "--calib-corpus", CORPUS,
                 "--calib-tokens", "2048", "--calib-seq-len", "128", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "moefy.json").read_text())


def test_all_experts_active_reproduce_the_source(llama_dir, converted):
    from densa.moefy.convert import Conversion, with_budget

    out, report = converted
    assert report["max_abs_logit_diff_all_experts"] < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    moe = resolve(str(out))
    assert moe.kind == "densa-checkpoint" and moe.model.config.ffn == "moe" and moe.tokenizer is not None
    full = with_budget(Conversion(moe.model, [torch.zeros(1, 16)] * 2), 1.0)  # zc_bias below every score
    ids = torch.tensor(encode(moe.tokenizer, corpus_text(CORPUS, "train", 3000))[:200])[None]
    with torch.no_grad():
        out_full = full(ids)
        torch.testing.assert_close(out_full.logits, hf(ids).logits, atol=1e-4, rtol=0)
        assert all(float(v) == 8 for k, v in out_full.aux.items() if k.endswith("mean_ffn_experts"))
        ours = full.generate(ids[:, :16], max_new_tokens=20)
        theirs = hf.generate(ids[:, :16], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(ours, theirs)


def test_budget_sets_active_experts(converted):
    out, _ = converted
    moe = resolve(str(out)).model
    assert moe.config.target_active_experts == 4 and moe.config.num_experts_per_tok == 8
    ids = torch.tensor(encode(resolve(str(out)).tokenizer, corpus_text(CORPUS, "train", 20_000))[:2048])
    with torch.no_grad():
        aux = moe(ids.view(16, 128)).aux  # the calibration text: the zc_bias was set to meet 4 of 8 on it
    used = [float(v) for k, v in aux.items() if k.endswith("mean_ffn_experts")]
    assert len(used) == 2 and all(abs(u - 4) < 0.25 for u in used)


def test_split_is_a_balanced_partition_and_clustering_concentrates_mass():
    torch.manual_seed(0)
    T, E, F = 512, 8, 6
    owner = torch.randperm(E * F) // F  # planted: neurons of one hidden group fire on the same tokens
    topic_T = torch.randint(0, E, (T,))
    act_TI = torch.randn(T, E * F) * 0.1 + (owner[None] == topic_T[:, None]) * torch.rand(T, E * F) * 3
    for groups in (cluster_split(act_TI, E), random_split(E * F, E)):
        assert groups.shape == (E, F) and torch.equal(groups.flatten().sort().values, torch.arange(E * F))
    clustered, rand = cluster_split(act_TI, E), random_split(E * F, E)
    assert all(len(owner[g].unique()) == 1 for g in clustered)  # recovers the planted groups exactly
    assert coactivation_score(act_TI, clustered, 1) > coactivation_score(act_TI, rand, 1) + 0.4


def test_router_fit_beats_a_random_router():
    torch.manual_seed(0)
    T, D, E, F = 2048, 32, 8, 4
    x_TD = torch.randn(T, D)
    mlp_gate, mlp_up, down_DI = torch.randn(E * F, D), torch.randn(E * F, D), torch.randn(D, E * F)
    act_TI = torch.nn.functional.silu(x_TD @ mlp_gate.T) * (x_TD @ mlp_up.T)
    norms_TE = group_norms(act_TI, down_DI, torch.arange(E * F).view(E, F))
    fit = fit_router(x_TD, norms_TE, k=4, steps=100)
    assert fit.recall > fit.recall_random + 0.1 and abs(fit.recall_random - 0.5) < 0.05
    assert topk_recall(norms_TE, norms_TE, 4) == 1.0


def test_converted_report_shows_a_fitted_router(converted):
    _, report = converted
    assert report["experts"] == 8 and report["expert_width"] == 16 and report["split"] == "cluster"
    for layer in report["layers"]:
        assert layer["router_recall"] > layer["random_router_recall"]


def test_inspect_routing_and_hf_export_work_on_the_conversion(converted, tmp_path, capsys):
    out, _ = converted
    assert main(["inspect-routing", str(out), "--text", "To be, or not to be"]) == 0
    assert "FFN experts per token (moe, 8 experts, 8 slots, target 4)" in capsys.readouterr().out
    assert main(["export", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, resolve(str(out)).model(ids).logits)


def test_router_tuning_moves_only_routers_and_holds_the_budget(converted, tmp_path):
    from densa.moefy.tune import TuneConfig, prepare_data, tune

    out, _ = converted
    resolved = resolve(str(out))
    model = resolved.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = prepare_data(resolved.tokenizer, CORPUS, 1, tmp_path)
    result = tune(model, data, tmp_path / "run", TuneConfig(steps=3, batch_size=4, context=64, corpus=CORPUS),
                  progress=False)
    assert result["tune_steps"] == 3 and not (tmp_path / "run" / "checkpoints").exists()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith((".gate.weight", ".gate.zc_bias")) for k in changed)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["routing/layers.0.mean_ffn_experts"] - 4) < 1.5 for r in records if r["kind"] == "train")


def test_cli_shared_experts_and_distillation(llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["moefy", str(llama_dir), "--experts", "8", "--budget", "0.5", "--shared", "0.25", "--calib-corpus", CORPUS,
            "--calib-tokens", "1024", "--calib-seq-len", "128", "--router-steps", "10", "--distill-steps", "2",
            "--distill-batch", "2", "--distill-context", "64", "--distill", "lora", "--lora-rank", "2",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 shared experts" in printed and "distilled 2 steps (256 tokens, lora) in" in printed
    report = json.loads((out / "moefy.json").read_text())
    assert report["shared_experts"] == 2 and report["distill_steps"] == 2 and report["distill_cpu_seconds"] > 0
    assert not (out / "distill" / "distill-state.pt").exists()  # the checkpoint is the result
    moe = resolve(str(out)).model
    assert moe.layers[0].mlp.gate.expert_bias[:2].tolist() == pytest.approx([2.0, 2.0], abs=1e-5)  # pinned on
    with torch.no_grad():
        used = moe(torch.randint(0, 300, (2, 64))).ffn_experts
    assert (used >= 2).all()  # every token runs at least the shared experts


@pytest.mark.parametrize(("argv", "message"), [
    (["--experts", "5"], "--experts 5: must divide the FFN intermediate size 128"),
    (["--experts", "8", "--budget", "1.5"], "--budget 1.5: must be in (0, 1]"),
    (["--experts", "8", "--calib-tokens", "0"], "--calib-tokens 0: must be >= 1"),
    (["--experts", "8", "--tune-steps", "-1"], "--tune-steps -1: must be >= 0"),
    (["--experts", "8", "--shared", "0.75"], "--shared 0.75: 6 shared experts of 8 exceed the budget 0.5"),
    (["--experts", "8", "--distill-steps", "3", "--on-policy", "2"], "--on-policy 2.0: must be in [0, 1]"),
])
def test_cli_errors_name_the_bad_input(llama_dir, tmp_path, capsys, argv, message):
    assert main(["moefy", str(llama_dir), *argv, "--out", str(tmp_path / "m")]) == 1
    assert message in capsys.readouterr().err


def test_non_llama_models_are_refused(tmp_path, capsys):
    from densa.checkpoint import save_checkpoint

    save_checkpoint(DensaModel(from_preset("tiny")), tmp_path / "mega")  # densa's Mega mixer: not a Llama
    assert main(["moefy", str(tmp_path / "mega"), "--experts", "4", "--out", str(tmp_path / "m")]) == 1
    assert "converts dense Llama-architecture models (mixer='attention', ffn='swiglu')" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["moefy", str(tmp_path / "gpt2"), "--experts", "4", "--out", str(tmp_path / "m")]) == 1
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


def test_serve_answers_with_the_conversion(converted):
    import openai

    from densa.serve.app import ServeConfig, build_app
    from densa.serve.command import BackgroundServer

    out, _ = converted
    moe = resolve(str(out))
    prompt = "To be, or not to be"
    ids = encode(moe.tokenizer, prompt)
    with torch.no_grad():
        alone = moe.model.generate(torch.tensor([ids]), max_new_tokens=8)[0, len(ids):].tolist()
    with BackgroundServer(build_app(moe.model, moe.tokenizer, ServeConfig(model_name="moe", context=256))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="moe", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == moe.tokenizer.decode(alone)


def test_study_runs_end_to_end_on_a_tiny_llama(llama_dir, tmp_path):
    import argparse

    from densa.study import moefy as study

    sets = [f"model={llama_dir}", "experts=8", "calib_tokens=512", "window=128", "eval_tokens=256", "val_tokens=256",
            "router_steps=10", "budgets=[1.0, 0.5]", 'splits=["cluster"]', "tune_steps=1", 'tuned=["cluster-b50"]',
            "tuned_all=[]",
            'timed=["cluster-b50"]', "benchmarks={}", "shared=[0.125, 0.25]", "distill_steps=2",
            "distill_pilot_steps=1", "distill_eval_every=1", "distill_batch=2", "distill_context=64",
            'distill_grid=[{"mode": "moe", "lr": 1e-3}, {"mode": "lora", "lr": 1e-3}]']
    args = argparse.Namespace(quick=False, overrides=sets, no_progress=True)
    result = study.run(args, tmp_path)
    assert abs(result["cluster-b100_bpb"] - result["dense_bpb"]) < 1e-4  # every expert active: the original
    assert abs(result["shared-b100_bpb"] - result["dense_bpb"]) < 1e-4
    assert result["cluster_all_experts_greedy_identical"]
    assert result["shared_all_experts_greedy_identical"] and result["shared_share"] in (0.125, 0.25)
    assert abs(result["cluster-b50_ffn_fraction"] - 0.5) < 0.15 and result["cluster-b50_flops_ratio"] < 1
    assert abs(result["teal-b50_ffn_fraction"] - 0.5) < 0.1 and result["teal-b50_flops_ratio"] < 1
    assert result["shared-b50-distilled_distill_cpu_seconds"] > 0 and len(result["distill_pilots"]) == 2
    # the headline is the 50% MoE variant with the best validation bpb, and it was timed
    halves = {k[: -len("_val_bpb")]: v for k, v in result.items()
              if k.endswith("-b50_val_bpb") or "-b50-" in k and k.endswith("_val_bpb")}
    halves.pop("teal-b50")
    assert result["bpb_increase_at_half_ffn_variant"] == min(halves, key=halves.get)
    assert result["prefill_speedup_at_half_ffn"] > 0 and result["teal_decode_speedup_at_half_ffn"] > 0
    assert (tmp_path / "moefy-bpb-vs-budget.png").is_file() and (tmp_path / "moefy.md").is_file()
    with pytest.raises(ValueError, match="--set 'nonsense=1': expected KEY=VALUE"):
        study.run(argparse.Namespace(quick=False, overrides=["nonsense=1"], no_progress=True), tmp_path)


def test_study_resumes_where_it_stopped(llama_dir, tmp_path, monkeypatch):
    """A run stopped during distillation continues in the same --out: what was scored is not scored again, the
    finished study reruns without any work, and other settings in the same --out are refused."""
    import argparse

    from densa.study import moefy as study

    sets = [f"model={llama_dir}", "experts=8", "calib_tokens=512", "window=128", "eval_tokens=256", "val_tokens=256",
            "router_steps=10", "budgets=[1.0, 0.5]", 'splits=["cluster"]', "tune_steps=0", "tuned=[]",
            "tuned_all=[]", "timed=[]", "benchmarks={}", "shared=[0.25]", "distill_steps=2", "distill_eval_every=1",
            "distill_batch=2", "distill_context=64", 'distill_grid=[{"mode": "moe", "lr": 1e-3}]']
    args = argparse.Namespace(quick=False, overrides=sets, no_progress=True)
    real_distill = study.distill

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "distill", stop)
    with pytest.raises(KeyboardInterrupt):
        study.run(args, tmp_path)
    first = json.loads((tmp_path / "state.json").read_text())["rows"]
    assert {"dense", "cluster-b100", "cluster-b50", "shared-b100", "shared-b50"} <= set(first)
    assert "shared-b50-distilled" not in first and "teal-b50" not in first

    scored: list[str] = []
    real_add = study.Study.add
    monkeypatch.setattr(study.Study, "add", lambda self, name, *a, **k: (scored.append(name),
                                                                          real_add(self, name, *a, **k)))
    monkeypatch.setattr(study, "distill", real_distill)
    result = study.run(args, tmp_path)
    assert scored == ["shared-b50-distilled", "teal-b50"]  # only what the stopped run had not scored
    assert result["cluster-b50_bpb"] == first["cluster-b50"]["bpb"] and result["shared_all_experts_greedy_identical"]
    assert result["shared-b50-distilled_distill_cpu_seconds"] > 0

    scored.clear()
    for name in ("convert", "distill", "score", "tune", "ffn_inputs"):
        monkeypatch.setattr(study, name, stop)
    again = study.run(args, tmp_path)
    assert scored == [] and again == result
    with pytest.raises(ValueError, match="other settings \\(distill_steps\\)"):
        study.run(argparse.Namespace(quick=False, overrides=[*sets, "distill_steps=3"], no_progress=True), tmp_path)


@pytest.mark.parametrize("bad, message", [("budgets=abc", "budgets='abc': expected list"),
                                          ("budgets=[0.5, 1.5]", r"each must be in \(0, 1\]"),
                                          ("tune_lr=fast", "tune_lr='fast': expected float"),
                                          ("splits=[\"kmeans\"]", "choose from cluster, random"),
                                          ("shared=[1.5]", r"shared=\[1.5\]: each must be in \(0, 1\)"),
                                          ('distill_grid=[{"mode": "full"}]', "choose moe, all or lora")])
def test_study_settings_fail_before_any_work(bad, message):
    import argparse

    from densa.study import moefy as study

    with pytest.raises(ValueError, match=message):
        study.study_config(argparse.Namespace(quick=False, overrides=[bad]))
