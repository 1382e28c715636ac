"""The `densa` command: help, one-line errors, init, quickstart."""

import json
import subprocess
import sys

import pytest

from densa.checkpoint import load_model
from densa.cli import COMMANDS, main
from densa.train.state import latest_checkpoint


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "densa", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown command 'frobnicate'" in proc.stderr


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--set", "attn_chunk_size=8", "--out", str(tmp_path / "m")]) == 0
    assert "parameters" in capsys.readouterr().out
    model = load_model(tmp_path / "m")
    assert model.config.attn_chunk_size == 8


@pytest.mark.parametrize(("argv", "message"), [
    (["init", "--preset", "huge"], "unknown preset 'huge'"),
    (["init", "--preset", "tiny", "--set", "ema_dim=-2"], "ema_dim=-2: must be an integer >= 1"),
    (["init", "--preset", "tiny", "--set", "colour=red"], "--set colour: unknown key"),
    (["init", "--config", "missing.yaml"], "recipe 'missing.yaml' does not exist"),
])
def test_init_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--preset", "tiny"])
    assert exit_.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_quickstart_runs(capsys, tmp_path):
    assert main(["quickstart", "--quick", "--out", str(tmp_path / "qs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "densa" in out and "dense baseline" in out and "bits/byte" in out and "[6/6" in out
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    densa, dense = summary["models"]["densa"], summary["models"]["dense baseline"]
    assert densa["training_flops"] == pytest.approx(dense["training_flops"], rel=0.1)  # equal training FLOPs
    assert densa["active"] < densa["params"]  # densa's FFN is the dynamic MoE
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "Intelligence Density" in report and "![" in report and (tmp_path / "qs" / "report.png").is_file()
    html = (tmp_path / "qs" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert load_model(latest_checkpoint(tmp_path / "qs" / "mega" / "checkpoints")).config.ffn == "moe"
    assert main(["quickstart", "--quick", "--out", str(tmp_path / "qs"), "--no-progress", "--steps", "2"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main(["quickstart", "--quick", "--out", str(tmp_path / "other")]) == 1
    assert "not written by densa quickstart" in capsys.readouterr().err
