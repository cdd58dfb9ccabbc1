"""The distill teacher as a logits cache: the original's logits on every training sequence, computed once before the
student loads and read back batch by batch, so that the teacher is not in memory while the student trains.

Logits are stored as the teacher computed them (bfloat16 stays bfloat16), one sequence after another, in
``<stage>/teacher-logits.bin``; the file is removed when the stage ends. Size: sequences x length x vocabulary x 2
or 4 bytes (64 x 256 tokens of a 49,152-token vocabulary in bfloat16: 1.5 GiB). Reading a batch is a file read, not
a memory map, so the file never counts in the process's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..utils.tensorfile import element_size, read_tensor, write_tensor

if TYPE_CHECKING:
    import torch


class TeacherLogits:
    """Rows of a teacher's logits on disk; ``rows(index)`` gives ``(B, L, V)`` for sequences ``index``."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: "torch.dtype"):
        self.path, self.shape, self.dtype = Path(path), shape, dtype

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * element_size(self.dtype)

    @classmethod
    def write(cls, path: Path, teacher: Any, data: Any, batch_size: int,
              progress: Callable[..., None] | None = None) -> "TeacherLogits":
        """Run ``teacher`` over every sequence of ``data`` (a ``TrainData``; ``batch_size`` at a time) and store its
        logits."""
        import torch

        n, length = data.input_ids.shape
        device = next(teacher.parameters()).device
        dtype, vocab = None, None
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        with open(tmp, "wb") as f:
            for i in range(0, n, batch_size):
                ids = data.input_ids[i: i + batch_size].to(device)
                mask = data.attention_mask[i: i + batch_size].to(device)
                with torch.inference_mode():
                    logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                dtype, vocab = logits.dtype, logits.shape[-1]
                write_tensor(f, logits)
                if progress is not None:
                    progress(len(ids))
        tmp.replace(path)
        return cls(Path(path), (n, length, vocab), dtype)

    def rows(self, index: "torch.Tensor") -> "torch.Tensor":
        """``(len(index), L, V)`` logits of the sequences ``index``, in the stored dtype, on the CPU."""
        import torch

        out = []
        with open(self.path, "rb") as f:
            for i in index.tolist():
                f.seek(i * self.row_bytes)
                out.append(read_tensor(f, self.shape[1:], self.dtype))
        return torch.stack(out)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
