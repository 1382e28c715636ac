"""The models `densa eval` compares, each turned into an lm-eval `LM`.

- Anything `densa.resolve` accepts (densa checkpoints and exports, Llama HF directories, `.gguf`, `smollm2-135m`)
  runs in process: the resolved `DensaModel` is wrapped in densa's Hugging Face class (`DensaForCausalLM`) and handed
  to lm-eval's own `HFLM`, so prompts, batching, truncation and scoring are lm-eval's.
- `openai:URL#MODEL_NAME` is an OpenAI-compatible endpoint, evaluated through lm-eval's `local-completions` API model:
  log-likelihood via `echo` + `logprobs` on /v1/completions, generation via /v1/completions (the same prompt text as
  in process, so scores are comparable). Log-likelihood needs the model's tokenizer to split context from
  continuation: the server's `/tokenize` when it has one, else a local tokenizer directory (`--endpoint-tokenizer`,
  or MODEL_NAME itself when it is a local model directory).
- `openai-chat:URL#MODEL_NAME` is a chat-only endpoint (what most hosted models offer), evaluated through lm-eval's
  `local-chat-completions` on /v1/chat/completions: generation tasks only, the prompt sent as chat messages (the
  server applies its chat template).
Both endpoint kinds send the key in `$api_key_env` and meter every request (densa.eval.endpoint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENDPOINT_PREFIX = "openai:"
CHAT_PREFIX = "openai-chat:"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


@dataclass
class EvalModel:
    name: str  # what the user typed; the key of every record
    kind: str  # resolve()'s kind ("densa-checkpoint", "gguf", ...) or "endpoint"
    lm: Any  # an lm_eval.api.model.LM
    tokenizer: Any | None  # a transformers tokenizer (None for an endpoint without one)
    model: Any | None = None  # the DensaModel (None for endpoints)
    base_url: str | None = None  # endpoints: .../v1
    served_name: str | None = None
    chat: bool = False  # prompts go through a chat template (openai-chat: endpoints; in process with --chat-template)
    key_env: str = DEFAULT_KEY_ENV  # endpoints: the environment variable holding the API key
    config_hash: str | None = None  # sha256 of the model config (densa ModelConfig as JSON)
    info: dict[str, Any] = field(default_factory=dict)  # parameters and other static facts for the report


def is_endpoint(spec: str) -> bool:
    return spec.startswith((ENDPOINT_PREFIX, CHAT_PREFIX))


def is_chat_endpoint(spec: str) -> bool:
    return spec.startswith(CHAT_PREFIX)


def parse_endpoint(spec: str) -> tuple[str, str]:
    """`openai:http://host:port/v1#name` (or `openai-chat:...`) -> ("http://host:port/v1", "name")."""
    prefix = CHAT_PREFIX if is_chat_endpoint(spec) else ENDPOINT_PREFIX
    url, sep, name = spec[len(prefix):].partition("#")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"model {spec!r}: an endpoint is written openai:URL#MODEL_NAME (completions) or "
                         "openai-chat:URL#MODEL_NAME (chat only), e.g. openai:http://127.0.0.1:8000/v1#my-model")
    return url.rstrip("/"), name


def load(spec: str, batch_size: int = 8, max_length: int | None = None, endpoint_tokenizer: str | None = None,
         max_gen_toks: int = 256, key_env: str = DEFAULT_KEY_ENV, chat_template: bool = False,
         compile: str = "off") -> EvalModel:
    """Build the lm-eval LM for one MODEL argument (errors name the model and the valid forms). `chat_template`:
    in-process models render prompts through their tokenizer's chat template, as a chat endpoint does. `compile`:
    the decode-step switch of densa/model/compile.py for in-process models (`DensaConfig.compile`)."""
    if is_endpoint(spec):
        return _load_endpoint(spec, batch_size, max_length, endpoint_tokenizer, max_gen_toks, key_env)
    return _load_local(spec, batch_size, max_length, max_gen_toks, chat_template, compile)


def _load_local(spec: str, batch_size: int, max_length: int | None, max_gen_toks: int,
                chat_template: bool = False, compile: str = "off") -> EvalModel:
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
    if chat_template and not getattr(tok, "chat_template", None):
        raise ValueError(f"model {spec!r}: --chat-template, but its tokenizer has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # HFLM pads batches; the padded positions are never scored
    cfg = resolved.model.config
    special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tok, k, None) is not None}
    hf_model = DensaForCausalLM(DensaConfig.from_model_config(cfg, architectures=["DensaForCausalLM"], compile=compile,
                                                              **special))
    hf_model.model = resolved.model  # the same weights, no copy
    hf_model.eval()
    lm = HFLM(pretrained=hf_model, tokenizer=tok, backend="causal", batch_size=batch_size, device="cpu",
              max_length=max_length or cfg.max_position_embeddings, max_gen_toks=max_gen_toks)
    counts = count_parameters(resolved.model)
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    return EvalModel(name=spec, kind=resolved.kind, lm=lm, tokenizer=tok, model=resolved.model, chat=chat_template,
                     config_hash=hashlib.sha256(config_json.encode()).hexdigest()[:16],
                     info={"params_total": counts.total, "params_active": counts.active,
                           "mixer": cfg.mixer, "ffn": cfg.ffn, "context": cfg.max_position_embeddings})


def _load_endpoint(spec: str, batch_size: int, max_length: int | None, endpoint_tokenizer: str | None,
                   max_gen_toks: int, key_env: str) -> EvalModel:
    from lm_eval.utils import check_remote_tokenizer_support

    from densa.eval.endpoint import MeteredChat, MeteredCompletions, api_key

    base_url, name = parse_endpoint(spec)
    chat = is_chat_endpoint(spec)
    key = api_key(key_env)
    served = _served_models(base_url, key_env)
    if served is not None and name not in served:
        raise ValueError(f"model {spec!r}: the endpoint serves {', '.join(map(repr, served)) or 'no models'}, "
                         f"not {name!r}")
    local_tok = endpoint_tokenizer or (name if (Path(name) / "tokenizer.json").is_file() else None)
    if local_tok is not None:
        if not (Path(local_tok) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"--endpoint-tokenizer {local_tok}: not a directory with tokenizer.json")
        kwargs: dict[str, Any] = {"tokenizer_backend": "huggingface", "tokenizer": str(local_tok)}
    elif not chat and check_remote_tokenizer_support(f"{base_url}/completions", max_retries=1, auth_token=key):
        kwargs = {"tokenizer_backend": "remote", "auth_token": key}
    else:  # generation still works; log-likelihood tasks will fail with lm-eval's "Tokenizer is required"
        kwargs = {"tokenizer_backend": "none"}
    max_length = max_length or (served or {}).get(name) or 2048
    if chat:  # messages, not token ids: the server applies its chat template
        lm: Any = MeteredChat(base_url=f"{base_url}/chat/completions", model=name, batch_size=1, num_concurrent=1,
                              max_length=max_length, max_gen_toks=max_gen_toks, max_retries=1,
                              tokenized_requests=False, tokenizer_backend=None)
        tokenizer = _hf_tokenizer(local_tok) if local_tok else None
    else:
        lm = MeteredCompletions(base_url=f"{base_url}/completions", model=name, batch_size=1, num_concurrent=1,
                                max_length=max_length, max_gen_toks=max_gen_toks, max_retries=1, **kwargs)
        tokenizer = lm.tokenizer if kwargs["tokenizer_backend"] != "none" else None
    lm.setup_metering(key_env)
    return EvalModel(name=spec, kind="endpoint", lm=lm, tokenizer=tokenizer, base_url=base_url, served_name=name,
                     chat=chat, key_env=key_env, info={"batch_size": batch_size, "chat": chat})


def _hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _served_models(base_url: str, key_env: str) -> dict[str, int | None] | None:
    """The endpoint's models from GET /v1/models, each with its context (`max_model_len`, as vLLM and densa serve
    report it, so lm-eval truncates prompts as the server will accept them); None when the endpoint has no usable
    listing (404 or another 4xx but 401/403, or not JSON). An endpoint nobody answers at, or one that refuses the
    key, is a one-line error."""
    from densa.eval.endpoint import EndpointError, api_key, request

    try:
        listing, _ = request("GET", f"{base_url}/models", api_key(key_env), key_env, timeout=10, retries=1)
    except EndpointError as exc:
        if exc.kind in ("auth", "unreachable", "overloaded"):
            raise
        return None
    except RuntimeError:  # another 4xx: no listing
        return None
    if not isinstance(listing.get("data"), list):
        return None
    return {entry["id"]: entry.get("max_model_len") if isinstance(entry.get("max_model_len"), int) else None
            for entry in listing["data"] if isinstance(entry, dict) and isinstance(entry.get("id"), str)}
