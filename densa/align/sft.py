"""Chat-formatted supervised fine-tuning with the loss on assistant tokens only, through TRL's SFTTrainer.

Examples are prompt/completion conversations (`prompt`: system + user turns, `completion`: the assistant turn).
SFTTrainer applies the tokenizer's chat template to both and labels only the completion's tokens — the assistant
text and its closing `<|im_end|>` — with -100 everywhere in the prompt (`completion_only_loss`, its default for
this format). `assistant_mask` below rebuilds that mask from the template alone, and tests/test_align.py checks the
trainer's labels against it. The model is wrapped by `DensaForTRL`, sharing its parameters, so what is trained is
the densa model itself; any MODEL (densa checkpoints, Llama HF folders, `smollm2-135m`) goes through the same path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from densa.align.config import Recipe
from densa.align.evaluate import generate_greedy, summarise
from densa.align.logs import JsonlLog, plot_curves, read_jsonl
from densa.align.policy import load_policy, save_policy
from densa.align.problems import gsm8k, heldout_and_ood, sft_examples, train_split, unanswerable
from densa.align.trl_model import DensaForTRL


def task_examples(recipe: Recipe, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt/completion examples of the recipe's task."""
    task = recipe.task
    if task.name == "gsm8k":
        return gsm8k("train")[:task.train_size], gsm8k("test")[:task.heldout_size]
    heldout, _ = heldout_and_ood(task.heldout_size, 0)
    problems: list = train_split(task.train_size, task.heldout_size, task.validation_size)
    if task.unanswerable_fraction:  # mixed in; both trainers shuffle, so appending is enough
        held = {u.question for name in ("heldout", "ood", "validation") for u in unanswerable(name, task.heldout_size)}
        problems += unanswerable("train", round(task.unanswerable_fraction * task.train_size), exclude=held)
    train = sft_examples(problems, task.verbose_fraction, seed)
    return train, sft_examples(heldout, 0.0, seed)


def assistant_mask(tok: Any, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: labels = ids on the assistant turn, -100 on the prompt."""
    prefix = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prefix):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def run_sft(recipe: Recipe, out: str | Path, progress: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Train, save the tuned MODEL to `out/model`, evaluate greedily on held-out items; returns the result dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.sft
    torch.manual_seed(cfg.seed)
    train, heldout = task_examples(recipe, cfg.seed)
    texts = [e["prompt"][-1]["content"] + "\n" + e["completion"][0]["content"] for e in train]
    model, tok = load_policy(recipe.policy, texts)
    trainer = SFTTrainer(
        model=DensaForTRL.wrap(model, tok), processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in train]),
        args=TRLSFTConfig(output_dir=str(out / "trainer"), use_cpu=not torch.cuda.is_available(),
                          bf16=cfg.precision == "bf16", per_device_train_batch_size=cfg.batch_size,
                          max_steps=cfg.steps, learning_rate=cfg.lr,
                          lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                          max_length=cfg.max_length, logging_steps=cfg.log_interval, seed=cfg.seed,
                          **checkpointing(cfg.save_every), report_to=[], gradient_checkpointing=False,
                          disable_tqdm=not progress, dataset_num_proc=None, completion_only_loss=True),
        callbacks=[JsonlLog(out / "metrics.jsonl")])
    curves = [("loss", "loss (assistant tokens)"), ("mean_token_accuracy", "token accuracy")]
    return finish_run(trainer, model, tok, out, curves, "sft.png", "densa sft", cfg.steps,
                      heldout if evaluate else None, recipe.task.max_new_tokens, progress)


def checkpointing(save_every: int) -> dict[str, Any]:
    """The trainer arguments for a resumable checkpoint (model, optimizer, schedule, RNG) every `save_every` steps in
    OUT/trainer, only the latest kept; 0: none."""
    if not save_every:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": save_every, "save_total_limit": 1, "save_only_model": False}


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` folder the trainer left in `folder`, if any (the trainer writes
    trainer_state.json after the weights, optimizer and RNG states, so a run killed while saving is skipped)."""
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(folder / f"checkpoint-{max(steps)}") if steps else None


def finish_run(trainer: Any, model: Any, tok: Any, out: Path, curves: list[tuple[str, str]], png: str, title: str,
               steps: int, heldout: list[dict] | None, max_new_tokens: int, progress: bool) -> dict[str, Any]:
    """What `densa sft` and `densa align` share after setup: train (continuing from the last checkpoint in
    out/trainer when a stopped run left one), save out/model, plot the logged curves, evaluate greedily on `heldout`
    (None: skip) and write out/result.json."""
    trainer.train(resume_from_checkpoint=last_checkpoint(out / "trainer"))
    shutil.rmtree(out / "trainer", ignore_errors=True)  # the checkpoints: the finished model is out/model
    model.eval()
    save_policy(model, tok, out / "model")
    plot_curves(read_jsonl(out / "metrics.jsonl"), curves, out / png, title)
    result: dict[str, Any] = {"model": str(out / "model"), "steps": steps}
    if heldout is not None:
        outputs = generate_greedy(model, tok, [e["prompt"] for e in heldout], [e["answer"] for e in heldout],
                                  max_new_tokens=max_new_tokens, progress=progress)
        result["heldout"] = summarise(outputs, tok)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
