"""Alignment: chat SFT (assistant-only loss), token-value RL (GRPO with correctness + length-aware rewards) and an
offline preference option, on generated arithmetic word problems or GSM8K (docs/alignment.md)."""
