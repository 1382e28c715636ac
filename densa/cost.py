"""What tokens cost in money: hardware prices and $ per 1M tokens, shared by `densa eval` and `densa serve`.

The price of a token is the price of the hardware time it occupies: `usd_per_1m = usd_per_hour / 3600 / tokens_per_s
* 1e6`. Input (prompt) tokens are priced at prefill throughput, output tokens at decode throughput; the blended price
weights them 3 input : 1 output, the convention of public price tables (docs/eval.md).
"""

from __future__ import annotations

# $/hour, on-demand list prices as of 2026 (documented in docs/eval.md; override with --usd-per-hour).
HARDWARE_USD_PER_HOUR: dict[str, float] = {
    "cpu-core": 0.05,  # one x86 vCPU of a general-purpose cloud instance (~$0.04–0.05 per vCPU-hour)
    "cpu-2core": 0.10,  # this project's reference machine: 2 cores
    "t4": 0.35,
    "l4": 0.80,
    "a10g": 1.00,
    "a100-80gb": 1.80,
    "h100": 2.50,
    "h200": 3.50,
}
DEFAULT_HARDWARE = "cpu-2core"
BLEND_INPUT, BLEND_OUTPUT = 3, 1


def usd_per_hour(hardware: str | None = None, override: float | None = None) -> float:
    """The hourly price: an explicit override, else the named hardware's list price."""
    if override is not None:
        if override < 0:
            raise ValueError(f"--usd-per-hour must be >= 0, got {override}")
        return float(override)
    name = hardware or DEFAULT_HARDWARE
    if name not in HARDWARE_USD_PER_HOUR:
        raise ValueError(f"unknown hardware {name!r}; choose from {', '.join(HARDWARE_USD_PER_HOUR)}")
    return HARDWARE_USD_PER_HOUR[name]


def usd_per_1m_tokens(tokens_per_s: float, price_per_hour: float) -> float:
    """$ per million tokens when the hardware processes `tokens_per_s` (inf if it processes none)."""
    if tokens_per_s <= 0:
        return float("inf")
    return price_per_hour / 3600.0 / tokens_per_s * 1e6


def blended_usd_per_1m(input_usd: float, output_usd: float) -> float:
    """The 3:1 input:output blended price per 1M tokens."""
    return (BLEND_INPUT * input_usd + BLEND_OUTPUT * output_usd) / (BLEND_INPUT + BLEND_OUTPUT)


def request_usd(seconds: float, price_per_hour: float, share: float = 1.0) -> float:
    """$ for one request that held the hardware for `seconds`, of which it used `share` (batched requests split it)."""
    return price_per_hour / 3600.0 * seconds * share
