"""`densa moefy`: turn a dense Llama-architecture model into a densa dynamic-compute MoE model (docs/moefy.md).

calibrate.py (calibration windows, FFN inputs) → split.py (neurons → experts) → fit.py (router, budget) →
convert.py (the converted DensaModel) → tune.py (optional brief tuning with densa's trainer); measure.py scores a
variant (held-out bits per byte, FLOPs at the measured expert counts, ms/token) for `densa study moefy`.
"""

from densa.moefy.convert import Conversion, MoefyConfig, convert, with_budget

__all__ = ["Conversion", "MoefyConfig", "convert", "with_budget"]
