"""The benchmarks' measurement helpers run end to end on tiny sizes and return the documented keys.

Only structure is checked (keys present, numbers positive): speed goals are checked by `densa bench`, never in unit
tests, because the machine is shared and timings are noisy.
"""

from __future__ import annotations

import pytest

from densa.bench import attention, decode
from densa.config import from_preset


def test_attention_bench_keys() -> None:
    result = attention.run_cases((64,), reps=1, isolated=False)  # in-process: memory figures may read 0 here
    for key in ("densa_ms", "dense_ms"):
        assert result[f"{key}_64"] > 0, key
    for key in ("densa_peak_mb", "dense_peak_mb"):
        assert result[f"{key}_64"] >= 0, key
    assert result["max_T"] == 64
    assert result["ratio_at_max_T"] == pytest.approx(result["densa_ms_64"] / result["dense_ms_64"], rel=1e-2)
    assert 0.8 < result["densa_params"] / result["dense_params"] < 1.25  # comparable layers


def test_attention_case_in_a_fresh_process_measures_memory() -> None:
    case = attention.measure_isolated("densa", 64, reps=1)  # what `densa bench attention` runs per case
    assert case["ms"] > 0 and case["peak_mb"] > 0 and case["cpu_util"] > 0


def test_attention_bench_rejects_unknown_layer() -> None:
    with pytest.raises(ValueError, match="unknown layer kind"):
        attention.build_layer("rnn")


def test_decode_bench_keys() -> None:
    result = decode.run_cases(from_preset("tiny"), (16, 48), steps=2, warmup=1)
    for kind in decode.KINDS:
        for context in (16, 48):
            assert result[f"{kind}_ms_per_token_{context}"] > 0
    assert result["max_ctx"] == 48
    assert result["hf_params"] == result["dense_params"]  # the HF Llama twin has the dense baseline's shape
    for key in ("densa_growth", "densa_vs_hf_at_max_ctx"):
        assert result[key] > 0
