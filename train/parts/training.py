"""What both parts share: the scenes they see, the tokenizer, the training loop and the finished-folder convention."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..data.synth import SynthConfig, generate_record
from .recipe import PARTS_SEED_OFFSET

REPORT = "part_report.json"  # written last: a folder with it is a complete part


def synth_records(synth: SynthConfig, seed: int, split: str, n: int, desc: str, progress: bool) -> list[dict]:
    """`n` scenes of the parts' own seed (``seed + PARTS_SEED_OFFSET``): never an image of the GranViT splits."""
    from tqdm import tqdm

    records = []
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        record = generate_record(synth, seed + PARTS_SEED_OFFSET, split, i)
        if record["regions"]:
            records.append(record)
    return records


def train_part_tokenizer(texts: list[str], vocab_size: int, added: list[str] = ()):
    """Byte-level BPE with single-digit numbers (as Qwen2.5), the chat role tokens (special) and `added` ordinary
    tokens (the box tokens, which decoded answers must keep)."""
    from ...processing_granvit import ASSISTANT_TOKEN, USER_TOKEN
    from ..tiny import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"extra_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN]}, replace_extra_special_tokens=False)
    if added:
        tokenizer.add_tokens(list(added))
    return tokenizer


def read_report(folder: Path) -> dict | None:
    report = Path(folder) / REPORT
    return json.loads(report.read_text()) if report.is_file() else None


def write_report(folder: Path, report: dict) -> None:
    (Path(folder) / REPORT).write_text(json.dumps(report, indent=2))


def publish(tmp: Path, folder: Path, report: dict) -> dict:
    """Move a finished part into place; atomic from the reader's side (a folder with its report is complete)."""
    write_report(tmp, report)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return report


class Progress(TrainerCallback):
    """A progress bar for a part's training (`bar`), or, for parts trained side by side in worker processes, one log
    line every tenth of the steps with the loss and the time left."""

    def __init__(self, name: str, bar: bool, log=print):
        self.name, self.bar, self.log, self.tqdm, self.start = name, bar, log, None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.start, self.first = time.time(), state.global_step
        if self.bar:
            self.tqdm = tqdm(total=state.max_steps, initial=state.global_step, desc=self.name, dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tqdm is not None and logs and "loss" in logs:
            self.tqdm.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.tqdm is not None:
            self.tqdm.update(state.global_step - self.tqdm.n)
        elif state.global_step % max(1, state.max_steps // 10) == 0:
            done = state.global_step - self.first
            left = (time.time() - self.start) / max(done, 1) * (state.max_steps - state.global_step)
            loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), float("nan"))
            self.log(f"  [{self.name}] step {state.global_step}/{state.max_steps}, loss {loss:.3f}, "
                     f"{left / 60:.1f} min left")

    def on_train_end(self, args, state, control, **kwargs):
        if self.tqdm is not None:
            self.tqdm.close()


class PartTrainer(Trainer):
    """The Trainer, with `scene_noise`: Gaussian noise added to the input embeddings where the batch's ``scene_mask``
    is set (std = scene_noise x the RMS norm of the embedding rows), while training only."""

    def __init__(self, *args, scene_noise: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scene_noise = scene_noise

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        mask = inputs.pop("scene_mask", None)
        if mask is not None and self.scene_noise and model.training:
            table = model.get_input_embeddings()
            embeds = table(inputs.pop("input_ids"))  # (batch, length, hidden)
            scale = self.scene_noise * table.weight.detach().pow(2).mean().sqrt()
            inputs["inputs_embeds"] = embeds + torch.randn_like(embeds) * scale * mask.unsqueeze(-1)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class StopAt(TrainerCallback):
    """Ends training at a step of a longer schedule (the learning rate follows the full schedule up to there)."""

    def __init__(self, step: int | None):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step >= self.step:
            control.should_training_stop = True


def train_loop(model, dataset, collate, *, name: str, steps: int, batch_size: int, lr: float, seed: int, bf16: bool,
               work_dir: Path, progress: bool, save_every: int = 0, log=print, callbacks=(), scene_noise: float = 0.0,
               stop_at: int | None = None) -> list:
    """AdamW + cosine through the Hugging Face Trainer (over `steps`, stopping at `stop_at` when given); returns the
    logged losses. With `save_every`, checkpoints go
    to `work_dir` and a rerun resumes from the newest one (the documents and images are functions of their index, so
    a resumed run sees what the uninterrupted one would)."""
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    work_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, adam_beta2=0.98, max_grad_norm=1.0,
        logging_steps=max(1, steps // 50), save_strategy="steps" if save_every else "no", save_steps=save_every or 500,
        save_total_limit=1, report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed, bf16=bf16,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = PartTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                          callbacks=[Progress(name, progress, log), *callbacks, StopAt(stop_at)],
                          scene_noise=scene_noise)
    for quiet in (PrinterCallback, ProgressCallback):  # the loss curve goes into the part's report
        trainer.remove_callback(quiet)
    resume = get_last_checkpoint(str(work_dir)) if save_every else None
    trainer.train(resume_from_checkpoint=resume)
    return [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]


def eager_attention(model):
    """Eager attention while a part trains in bf16 on the CPU: PyTorch's fused SDPA backward was slower in bf16 there
    (BENCHMARKS.md, "Pretrained parts"); the saved config keeps the default."""
    model.set_attn_implementation("eager")
    return model
