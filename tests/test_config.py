import json

import pytest

from densa.config import PRESETS, ConfigError, ModelConfig, from_preset, load_config, parse_overrides
from densa.counting import count_parameters
from densa.model.model import DensaModel


def test_json_round_trip(tmp_path):
    cfg = from_preset("cpu-small", complex_ema=True, attn_chunk_size=128)
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["attn_chunk_size"] == 128


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 0, 1e6), ("cpu-small", 5e6, 10e6),
                                                   ("cpu-base", 25e6, 35e6), ("gpu-1b", 0.9e9, 1.4e9),
                                                   ("cpu-small-moe", 15e6, 20e6), ("gpu-1b-moe", 2e9, 5e9)])
def test_preset_sizes(name, low, high):
    import torch

    with torch.device("meta"):  # no memory for the 1B preset
        total = count_parameters(DensaModel(from_preset(name))).total
    assert low <= total <= high


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_size", 0, "hidden_size=0: must be an integer >= 1"),
    ("rms_norm_eps", 2.0, "rms_norm_eps=2.0: must be in (0, 1)"),
    ("mixer", "rnn", "mixer='rnn': must be one of ['mega', 'attention', 'deltanet']"),
    ("value_dim", 129, "value_dim=129: must be divisible by num_attention_heads=2"),
    ("hidden_size", "64", "hidden_size='64': expected int, got str"),
    ("complex_ema", 1, "complex_ema=1: expected bool, got int"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        from_preset("tiny", **{field: value})
    assert message in str(err.value)


def test_unknown_preset_and_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match="available: tiny, cpu-small"):
        from_preset("huge")
    with pytest.raises(ConfigError, match="valid keys: vocab_size, hidden_size"):
        from_preset("tiny", hiden_size=3)
    with pytest.raises(ConfigError, match="unknown config key"):
        ModelConfig.from_dict({"nope": 1})


def test_overrides_are_typed():
    assert parse_overrides(["hidden_size=128", "model.complex_ema=true", "rope_theta=5e5", "mixer=attention"]) == {
        "hidden_size": 128, "complex_ema": True, "rope_theta": 5e5, "mixer": "attention"}
    with pytest.raises(ConfigError, match="expected int"):
        parse_overrides(["hidden_size=big"])
    with pytest.raises(ConfigError, match="expected a boolean"):
        parse_overrides(["complex_ema=maybe"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["hidden_size"])


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\n  attn_chunk_size: 8\n  ema_dim: 2\n")
    cfg = load_config(recipe=recipe, overrides=["ema_dim=3"])
    assert (cfg.hidden_size, cfg.attn_chunk_size, cfg.ema_dim) == (64, 8, 3)
    recipe.write_text("model:\n  preset: tiny\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(recipe=recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(recipe=tmp_path / "missing.yaml")


def test_recipe_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path, capsys):
    from densa.cli import main as cli_main
    from densa.train.config import load_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  preset: tiny\n  hidden_size: [64\ntrain: {data: d}\n")  # unclosed [ on line 3
    message = (f"recipe {recipe}:4:6: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow "
               "sequence that starts on line 3)")
    with pytest.raises(ConfigError) as err:
        load_config(recipe=recipe)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"bad.yaml:4:6: invalid YAML"):
        load_recipe(recipe)
    recipe.write_text("model:\n\tpreset: tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: invalid YAML: found character '\\t' that cannot start"):
        load_config(recipe=recipe)
    for command in ("init", "train"):
        assert cli_main([command, "--config", str(recipe), "--out", str(tmp_path / command)]) == 1
        err_lines = capsys.readouterr().err.splitlines()
        assert err_lines == [f"densa {command}: error: recipe {recipe}:2:1: invalid YAML: found character '\\t' "
                             "that cannot start any token (while scanning for the next token)"]


def test_shipped_recipes_build():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ should ship at least one recipe"
    for path in recipes:
        load_config(recipe=path)


def test_presets_are_plain_data():
    assert all(isinstance(v, dict) for v in PRESETS.values())


def test_cpu_small_moe_is_what_quickstart_trains():
    from densa.quickstart import MODELS

    assert ModelConfig(**MODELS["densa"](PRESETS["cpu-small"])) == from_preset("cpu-small-moe")
    assert MODELS["dense baseline"](PRESETS["cpu-small"])["mixer"] == "attention"


def test_gpu_preset_keeps_the_cpu_recipe_proportions():
    cpu, gpu = from_preset("cpu-small-moe"), from_preset("gpu-1b-moe")
    for cfg, size in ((cpu, from_preset("cpu-small")), (gpu, from_preset("gpu-1b"))):
        assert cfg.value_dim == size.hidden_size and cfg.ema_dim == 8 and cfg.mixer == "mega"
        assert cfg.intermediate_size == size.intermediate_size and cfg.num_experts == 16
    assert (gpu.num_experts_per_tok, gpu.target_active_experts) == (cpu.num_experts_per_tok, cpu.target_active_experts)
