"""`densa moefy`: turn a dense Llama-architecture model into a densa dynamic-compute MoE model (docs/moefy.md).

calibrate.py (calibration windows, FFN inputs) → split.py (neurons → experts; shared.py: always-on shared experts)
→ fit.py (router, budget) → convert.py (the converted DensaModel) → tune.py (optional brief tuning with densa's
trainer) / distill.py (KL distillation against the original); teal.py is the neuron-level baseline and measure.py
times a variant for `densa study moefy` (bits per byte and FLOPs come from densa/measure.py).
"""

from densa.moefy.convert import Conversion, MoefyConfig, convert, with_budget

__all__ = ["Conversion", "MoefyConfig", "convert", "with_budget"]
