"""The models `densa eval` compares, each turned into an lm-eval `LM`.

- Anything `densa.resolve` accepts (densa checkpoints and exports, Llama HF directories, `.gguf`, `smollm2-135m`)
  runs in process: the resolved `DensaModel` is wrapped in densa's Hugging Face class (`DensaForCausalLM`) and handed
  to lm-eval's own `HFLM`, so prompts, batching, truncation and scoring are lm-eval's.
- `openai:URL#MODEL_NAME` is an OpenAI-compatible endpoint, evaluated through lm-eval's `local-completions` API model:
  log-likelihood via `echo` + `logprobs` on /v1/completions, generation via /v1/completions (the same prompt text as
  in process, so scores are comparable). Log-likelihood needs the model's tokenizer to split context from
  continuation: the server's `/tokenize` when it has one, else a local tokenizer directory (`--endpoint-tokenizer`,
  or MODEL_NAME itself when it is a local model directory).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENDPOINT_PREFIX = "openai:"


@dataclass
class EvalModel:
    name: str  # what the user typed; the key of every record
    kind: str  # resolve()'s kind ("densa-checkpoint", "gguf", ...) or "endpoint"
    lm: Any  # an lm_eval.api.model.LM
    tokenizer: Any | None  # a transformers tokenizer (None for an endpoint without one)
    model: Any | None = None  # the DensaModel (None for endpoints)
    base_url: str | None = None  # endpoints: .../v1
    served_name: str | None = None
    config_hash: str | None = None  # sha256 of the model config (densa ModelConfig as JSON)
    info: dict[str, Any] = field(default_factory=dict)  # parameters and other static facts for the report


def is_endpoint(spec: str) -> bool:
    return spec.startswith(ENDPOINT_PREFIX)


def parse_endpoint(spec: str) -> tuple[str, str]:
    """`openai:http://host:port/v1#name` -> ("http://host:port/v1", "name")."""
    url, sep, name = spec[len(ENDPOINT_PREFIX):].partition("#")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"model {spec!r}: an endpoint is written openai:URL#MODEL_NAME, e.g. "
                         "openai:http://127.0.0.1:8000/v1#my-model")
    return url.rstrip("/"), name


def load(spec: str, batch_size: int = 8, max_length: int | None = None, endpoint_tokenizer: str | None = None,
         max_gen_toks: int = 256) -> EvalModel:
    """Build the lm-eval LM for one MODEL argument (errors name the model and the valid forms)."""
    if is_endpoint(spec):
        return _load_endpoint(spec, batch_size, max_length, endpoint_tokenizer, max_gen_toks)
    return _load_local(spec, batch_size, max_length, max_gen_toks)


def _load_local(spec: str, batch_size: int, max_length: int | None, max_gen_toks: int) -> EvalModel:
    from lm_eval.models.huggingface import HFLM

    from densa.counting import count_parameters
    from densa.hf import DensaConfig, DensaForCausalLM
    from densa.resolve import resolve

    try:
        resolved = resolve(spec)
    except FileNotFoundError as exc:
        raise ValueError(f"{exc}; a MODEL is a densa checkpoint or export, a Hugging Face Llama directory, a .gguf "
                         "file, smollm2-135m, or openai:URL#MODEL_NAME") from None
    tok = resolved.tokenizer
    if tok is None:
        raise ValueError(f"model {spec!r} ships no tokenizer (tokenizer.json); lm-eval needs one to build prompts")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # HFLM pads batches; the padded positions are never scored
    cfg = resolved.model.config
    special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tok, k, None) is not None}
    hf_model = DensaForCausalLM(DensaConfig.from_model_config(cfg, architectures=["DensaForCausalLM"], **special))
    hf_model.model = resolved.model  # the same weights, no copy
    hf_model.eval()
    lm = HFLM(pretrained=hf_model, tokenizer=tok, backend="causal", batch_size=batch_size, device="cpu",
              max_length=max_length or cfg.max_position_embeddings, max_gen_toks=max_gen_toks)
    counts = count_parameters(resolved.model)
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    return EvalModel(name=spec, kind=resolved.kind, lm=lm, tokenizer=tok, model=resolved.model,
                     config_hash=hashlib.sha256(config_json.encode()).hexdigest()[:16],
                     info={"params_total": counts.total, "params_active": counts.active,
                           "mixer": cfg.mixer, "ffn": cfg.ffn, "context": cfg.max_position_embeddings})


def _load_endpoint(spec: str, batch_size: int, max_length: int | None, endpoint_tokenizer: str | None,
                   max_gen_toks: int) -> EvalModel:
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import check_remote_tokenizer_support

    base_url, name = parse_endpoint(spec)
    served = _served_models(base_url)
    if served is not None and name not in served:
        raise ValueError(f"model {spec!r}: the endpoint serves {', '.join(map(repr, served)) or 'no models'}, "
                         f"not {name!r}")
    local_tok = endpoint_tokenizer or (name if (Path(name) / "tokenizer.json").is_file() else None)
    if local_tok is not None:
        if not (Path(local_tok) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"--endpoint-tokenizer {local_tok}: not a directory with tokenizer.json")
        kwargs: dict[str, Any] = {"tokenizer_backend": "huggingface", "tokenizer": str(local_tok)}
    elif check_remote_tokenizer_support(f"{base_url}/completions", max_retries=1):
        kwargs = {"tokenizer_backend": "remote"}
    else:  # generation still works; log-likelihood tasks will fail with lm-eval's "Tokenizer is required"
        kwargs = {"tokenizer_backend": "none"}
    max_length = max_length or (served or {}).get(name) or 2048
    lm = LocalCompletionsAPI(base_url=f"{base_url}/completions", model=name, batch_size=1, num_concurrent=1,
                             max_length=max_length, max_gen_toks=max_gen_toks, max_retries=2, **kwargs)
    tokenizer = lm.tokenizer if kwargs["tokenizer_backend"] != "none" else None
    return EvalModel(name=spec, kind="endpoint", lm=lm, tokenizer=tokenizer, base_url=base_url, served_name=name,
                     info={"batch_size": batch_size})


def _served_models(base_url: str) -> dict[str, int | None] | None:
    """The endpoint's models from GET /v1/models, each with its context (`max_model_len`, as vLLM and densa serve
    report it, so lm-eval truncates prompts as the server will accept them); None when the endpoint has no usable
    listing (an HTTP error such as 401, or not JSON). An endpoint nobody answers at is a one-line OSError."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
            listing = json.loads(response.read())
    except urllib.error.HTTPError:
        return None
    except OSError as exc:  # connection refused, unknown host, timeout
        raise OSError(f"cannot reach the endpoint {base_url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        return None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return None
    return {entry["id"]: entry.get("max_model_len") if isinstance(entry.get("max_model_len"), int) else None
            for entry in listing["data"] if isinstance(entry, dict) and isinstance(entry.get("id"), str)}
