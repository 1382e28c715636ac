"""`densa export MODEL --to hf [--remote-code] --out DIR`: a standard Hugging Face model folder.

- Plain: `config.json` (`model_type: "densa"`), `model.safetensors`, `generation_config.json` and the tokenizer
  files. `AutoModelForCausalLM.from_pretrained(DIR)` loads it wherever `densa` is imported.
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
import tempfile
from pathlib import Path

import densa
from densa.hf.configuration_densa import DensaConfig
from densa.hf.modeling_densa import DensaForCausalLM
from densa.resolve import ResolvedModel, resolve

PACKAGE_ROOT = Path(densa.__file__).parent
ENTRY_MODULES = {"configuration_densa": "densa.hf.configuration_densa", "modeling_densa": "densa.hf.modeling_densa"}
_IMPORT = re.compile(r"^(\s*)from (densa(?:\.\w+)*) import ", re.MULTILINE)


def export_hf(resolved: ResolvedModel, out: str | Path, remote_code: bool = False, overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass --force to write into it)")
    tok = resolved.tokenizer
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
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")


def main(args: argparse.Namespace) -> None:
    resolved = resolve(args.model)
    out = export_hf(resolved, args.out, remote_code=args.remote_code, overwrite=args.force)
    how = "trust_remote_code=True, densa not needed" if args.remote_code else "with densa installed and imported"
    print(f"exported {args.model} ({resolved.kind}) to {out}: load with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) ({how})")
