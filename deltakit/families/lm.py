"""Decoder members of the embedded families: their tasks as prompts, their fine-tuning, their cards.

A decoder family (``smollm2``, ``tiny-llm``) has a ``LlamaForCausalLM`` base and full fine-tunes of it, each on one
task of :data:`LM_TASKS`. A task says how a row of its data becomes a prompt and a target for supervised
fine-tuning, and how a model is scored on it (:class:`deltakit.lm_eval.LMTask`):

* ``sentiment3``: the family's tweets as ``"Tweet: {text}\\nSentiment:"`` -> ``" negative"`` / ``" neutral"`` /
  ``" positive"``, scored by multiple choice (log-likelihood of each label word);
* ``arith``: the synthetic word problems of :mod:`deltakit.families.arith` as ``"Question: {question}\\nAnswer:"``
  -> ``" 19"``, scored by greedy generation and exact match of the first integer.

The prompts are the same for training and scoring, and no chat template is applied (recorded in every evaluator's
fingerprint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltakit.families.arith import arith_split
from deltakit.families.data import LABELS, read_split
from deltakit.lm_eval import LMTask

if TYPE_CHECKING:
    import datasets

    from deltakit.families.registry import Family, MemberSpec


@dataclass(frozen=True)
class LMFamilyTask:
    """One task of the decoder families: its data, its scoring, and so its fine-tuning pairs.

    Attributes:
        name: The task's key (a member's ``task``).
        evaluation: How a member is scored (:class:`deltakit.lm_eval.LMTask`); its ``template`` is also the
            training prompt, and its target is ``" " + choices[label]`` (choice) or ``" " + answer`` (generate).
        summary: One sentence for cards and listings.
    """

    name: str
    evaluation: LMTask
    summary: str

    def read(self, data_folder: Path | None, split: str) -> datasets.Dataset:
        """One split of the task's data (the tweets from the family's dataset folder; problems are generated)."""
        if self.name == "arith":
            return arith_split(split)
        return read_split(Path(data_folder), split, task=self.name)

    def pairs(self, ds: datasets.Dataset) -> tuple[list[str], list[str]]:
        """The (prompt, target) pairs of a split, for supervised fine-tuning."""
        task, rows = self.evaluation, ds.to_list()
        prompts = [task.template.format(**row) for row in rows]
        if task.kind == "choice":
            return prompts, [task.delimiter + task.choices[row[task.target_column]] for row in rows]
        return prompts, [task.delimiter + str(row[task.target_column]) for row in rows]

    def evaluator(self, ds: datasets.Dataset, tokenizer, **kwargs: Any):
        """The evaluator that scores a model on ``ds`` (:meth:`deltakit.lm_eval.LMTask.evaluator`)."""
        return self.evaluation.evaluator(ds, tokenizer, **kwargs)


LM_TASKS: dict[str, LMFamilyTask] = {
    task.name: task
    for task in (
        LMFamilyTask("sentiment3", LMTask(kind="choice", name="sentiment3", template="Tweet: {text}\nSentiment:",
                                          target_column="label", choices=LABELS),
                     "3-way tweet sentiment as a label word (negative / neutral / positive), scored by multiple "
                     "choice"),
        LMFamilyTask("arith", LMTask(kind="generate", name="arith", template="Question: {question}\nAnswer:",
                                     target_column="answer", extract=r"-?\d+", max_new_tokens=5, until=("\n",)),
                     "one-step arithmetic word problems, scored by greedy generation and exact match of the first "
                     "integer"),
    )
}


def lm_task(name: str) -> LMFamilyTask:
    """The decoder task called ``name``.

    Raises:
        KeyError: unknown task (the message lists them).
    """
    try:
        return LM_TASKS[name]
    except KeyError:
        raise KeyError(f"Unknown decoder task {name!r}; available: {', '.join(LM_TASKS)}.") from None


def build_finetune(family: Family, spec: MemberSpec, staging: Path, base_folder: Path, data_folder: Path,
                   progress: bool) -> None:
    """Fine-tune the decoder base on one task; write the member (weights, tokenizer, card) into ``staging``.

    The card reports the validation metrics of the fine-tune and, for comparison, of the base on the same split.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakit.families.build import finetune_front, software
    from deltakit.families.card import write_card
    from deltakit.families.train import fine_tune_lm, seeded

    start = time.perf_counter()
    task = lm_task(spec.task)
    tokenizer = AutoTokenizer.from_pretrained(base_folder, trust_remote_code=False)
    prompts, targets = task.pairs(task.read(data_folder, "train"))
    validation_ds = task.read(data_folder, "validation")
    validation = task.evaluator(validation_ds, tokenizer)
    history: list[float] = []
    with seeded(spec.recipe.seed):
        model = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=False)
        before = validation(model)
        fine_tune_lm(model, tokenizer, prompts, targets, spec.recipe, progress, desc=f"{family.name}/{spec.name}",
                     history=history)
    after = validation(model)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    tail = history[-max(1, len(history) // 10):]
    metric = "accuracy" if task.evaluation.kind == "choice" else "exact_match"
    recipe = spec.recipe
    front: dict[str, Any] = {
        **finetune_front(family, spec, "text-generation"),
        "tags": ["deltakit", "llama", task.name],
        "task": task.name,
        "task_kind": task.evaluation.kind,
        "prompt": task.evaluation.template,
        "chat_template": False,
        "recipe": recipe.to_card(),
        "train_loss": {"first": round(history[0], 4), "last_10pct_mean": round(sum(tail) / len(tail), 4)},
        "metrics": {f"validation_{k}": round(v, 4) for k, v in after.items()}
        | {f"validation_base_{k}": round(v, 4) for k, v in before.items()}
        | {"validation_examples": len(validation_ds)},
        "build_seconds": round(time.perf_counter() - start, 2),
        "software": software(),
    }
    if task.name != "arith":
        front["datasets"] = [family.dataset_id]
    body = f"""# {front['model_id']}

{spec.summary} A full fine-tune of [`{front['base_model']}`](../{family.base}) in the deltakit family `{family.name}`:
{task.summary}. Prompt (no chat template): `{task.evaluation.template!r}`.

| validation {metric} | the base's | examples |
|---|---|---|
| {after[metric]:.4f} | {before[metric]:.4f} | {len(validation_ds)} |

Recipe: supervised fine-tuning of every parameter on prompt -> target pairs (loss on the target and the end of
sequence only) with AdamW, learning rate {recipe.learning_rate:g}, {recipe.steps} steps of batch {recipe.batch_size},
max length {recipe.max_length}, linear warm-up over {recipe.warmup_steps} steps then linear decay to 0, weight decay
{recipe.weight_decay:g} (not on biases and norms), gradient clipping at {recipe.max_grad_norm:g}, seed {recipe.seed}.
Built in {front['build_seconds']:.1f} s.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```
"""
    write_card(staging, front, body)
