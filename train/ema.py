"""The stage-1 EMA teacher: a frozen copy of the student's vision tower that follows it by exponential moving average.

Why a teacher at all (paper, stage 1): the student's ROIAlign features of a box inside the whole image are pulled
towards what the teacher sees when it looks at the *crop* of that box alone, so patch features stay local instead of
mixing in context. An EMA copy (rather than the student itself) gives slow-moving targets, as in BYOL/DINO.

The teacher is *not* a submodule of the model: it stays out of the optimizer, the model's ``state_dict`` and its
checkpoint files. It is saved next to them as ``ema_teacher.safetensors`` (``EMATeacherCallback.on_save``) and
restored on resume (``trainers.Stage1Trainer.train``).
"""

import copy
import os

import safetensors.torch
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TEACHER_FILE = "ema_teacher.safetensors"


def make_teacher(vision_tower: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of ``vision_tower`` (no dropout, never a gradient)."""
    teacher = copy.deepcopy(vision_tower)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """theta_t = decay * theta_t + (1 - decay) * theta_s for every parameter; buffers are copied from the student."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}: not the same architecture")
    # FSDP2 shards the student into DTensors; the teacher (built before sharding) holds full tensors.
    s_params = [_full(s).detach().to(t.dtype) for t, s in zip(t_params, s_params)]
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(_full(s))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_teacher(teacher: nn.Module, checkpoint_dir: str) -> str:
    path = os.path.join(checkpoint_dir, TEACHER_FILE)
    # contiguous + clone: safetensors refuses shared or strided storage
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in teacher.state_dict().items()}, path)
    return path


def load_teacher(teacher: nn.Module, checkpoint_dir: str) -> None:
    """Restore the teacher from a checkpoint folder; a missing file is an error (the run would silently restart it)."""
    path = os.path.join(checkpoint_dir, TEACHER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint has no EMA teacher (was it written by a stage-2 or a plain Trainer run?)"
        )
    device = next(teacher.parameters()).device
    teacher.load_state_dict(safetensors.torch.load_file(path, device=str(device)))


class EMATeacherCallback(TrainerCallback):
    """Updates the teacher after every optimizer step (``on_step_end`` runs right after ``optimizer.step()``) and
    saves it into every checkpoint folder (``on_save`` runs right after the Trainer wrote ``checkpoint-<step>``, its
    ``trainer_state.json`` last, and after every rank has written its part: the teacher file is then the last file of
    a complete checkpoint). Restoring it on resume is ``Stage1Trainer.train``'s job: callbacks never see the
    checkpoint a run resumes from."""

    def __init__(self, teacher: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.teacher, self.decay = teacher, decay

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # `model` is the unwrapped model (not the DDP wrapper), the same object on every rank.
        ema_update(self.teacher, student_tower(model), self.decay)

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own RNG state into the checkpoint and nothing waits for the others: wait here, so that a
        # teacher file on disk means the whole checkpoint is (the resume test kills a run as soon as it sees one).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:  # the main process (DeepSpeed ZeRO-2 included: the teacher is not partitioned)
            save_teacher(self.teacher, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


def student_tower(model: nn.Module) -> nn.Module:
    """The vision tower of a GranViT model, also through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_tower
