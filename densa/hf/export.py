"""`densa export MODEL --to hf [--remote-code] [--tokenizer DIR] --out DIR`: a standard Hugging Face model folder.

- Plain: `config.json` (`model_type: "densa"`), `model.safetensors`, `generation_config.json` and the tokenizer
  files. `AutoModelForCausalLM.from_pretrained(DIR)` loads it wherever `densa` is imported.
- The tokenizer is MODEL's own (a checkpoint written with `densa init --tokenizer`, an export, a Llama folder, a
  GGUF) or `--tokenizer DIR`'s; without one the command warns, since `pipeline("text-generation")` and
  `densa serve` need it.
- `--remote-code` adds densa's model source to the folder and an `auto_map` to the config, so that
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works with densa *not* installed.
  The source is not a second copy written by hand: the export copies densa's own modules, flattening
  `from densa.a.b import X` into `from .densa_a_b import X` (transformers loads relative imports of remote code).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import densa
from densa.hf.configuration_densa import DensaConfig
from densa.hf.modeling_densa import DensaForCausalLM
from densa.resolve import ResolvedModel, resolve

PACKAGE_ROOT = Path(densa.__file__).parent
ENTRY_MODULES = {"configuration_densa": "densa.hf.configuration_densa", "modeling_densa": "densa.hf.modeling_densa"}
_IMPORT = re.compile(r"^(\s*)from (densa(?:\.\w+)*) import ", re.MULTILINE)


def export_hf(resolved: ResolvedModel, out: str | Path, remote_code: bool = False, overwrite: bool = False,
              tokenizer: Any | None = None) -> Path:
    """Write `resolved` as a Hugging Face folder, with `tokenizer` (default: the model's own, if any)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass --force to write into it)")
    tok = tokenizer if tokenizer is not None else resolved.tokenizer
    vocab = resolved.model.config.vocab_size
    if tok is not None and len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok):,} entries but the model's vocabulary is {vocab:,}")
    special = {}
    if tok is not None:
        special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(tok, k, None) is not None}
    config = DensaConfig.from_model_config(resolved.model.config, architectures=["DensaForCausalLM"], **special)
    hf_model = DensaForCausalLM(config)
    hf_model.model.load_state_dict(resolved.model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        hf_model.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        if remote_code:
            write_remote_code(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            shutil.move(str(item), out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def module_file(module: str) -> Path:
    return PACKAGE_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")


def flat_name(module: str) -> str:
    """densa.model.mega → densa_model_mega (the entry modules keep their HF names)."""
    inverse = {v: k for k, v in ENTRY_MODULES.items()}
    return inverse.get(module, module.replace(".", "_"))


def write_remote_code(folder: Path) -> list[str]:
    """Copy densa's model modules into `folder` with flattened relative imports; add `auto_map` to config.json."""
    written, todo = [], list(ENTRY_MODULES.values())
    while todo:
        module = todo.pop()
        if flat_name(module) in written:
            continue
        source = module_file(module).read_text()
        imported = _IMPORT.findall(source)
        for _, dep in imported:
            if dep == "densa" or module_file(dep).name == "__init__.py" or not module_file(dep).is_file():
                raise ValueError(f"{module} imports {dep!r}, which the remote-code export cannot flatten; import the "
                                 "defining module instead")
            todo.append(dep)
        flat = _IMPORT.sub(lambda m: f"{m.group(1)}from .{flat_name(m.group(2))} import ", source)
        (folder / f"{flat_name(module)}.py").write_text(flat)
        written.append(flat_name(module))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoConfig": "configuration_densa.DensaConfig",
                          "AutoModelForCausalLM": "modeling_densa.DensaForCausalLM"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(written)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="densa checkpoint or export, Llama HF dir, .gguf, smollm2-135m")
    parser.add_argument("--to", choices=["hf"], required=True, help="target format (Hugging Face folder)")
    parser.add_argument("--remote-code", action="store_true",
                        help="bundle the model code so it loads with trust_remote_code=True and without densa")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder to ship (default: MODEL's own)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")


def main(args: argparse.Namespace) -> None:
    resolved = resolve(args.model)
    tokenizer = None
    if args.tokenizer:
        from densa.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    out = export_hf(resolved, args.out, remote_code=args.remote_code, overwrite=args.force, tokenizer=tokenizer)
    how = "trust_remote_code=True, densa not needed" if args.remote_code else "with densa installed and imported"
    print(f"exported {args.model} ({resolved.kind}) to {out}: load with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) ({how})")
    if tokenizer is None and resolved.tokenizer is None:
        print(f"densa export: warning: {args.model} has no tokenizer, so neither has {out}: "
              "pipeline(\"text-generation\") and `densa serve` need one; pass --tokenizer DIR", file=sys.stderr)
