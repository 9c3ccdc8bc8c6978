"""Training batches as DeepSpeed's pipeline engine consumes them, and the per-token loss over the global batch.

`lm_batches` turns loader batches into (inputs, labels) pairs. `GlobalTokenBatches` groups them by optimizer step
and attaches to each micro-batch's labels the divisor that makes the step's loss the mean over every loss token
of the global batch.

Why a divisor travels with the labels. DeepSpeed's PipelineEngine computes each micro-batch's loss with the
model's loss_fn, divides it by gradient_accumulation_steps (gas) before backward, and the DP gradient all-reduce
averages over the dp ranks. So the step's gradient is that of

    (1 / (gas * dp)) * sum over the step's micro-batches m of loss_m.

A per-micro-batch mean (loss_m = sum_m / n_m, n_m its loss tokens) weighs a micro-batch of 10 assistant tokens as
much as one of 4,000: the gradient-accumulation loss defect (Hugging Face transformers fixed it in 2024;
megatron-core's `calculate_per_token_loss` avoids it). With

    loss_m = sum_m / d,   d = N / (gas * dp),   N = loss tokens of the whole global batch,

the step minimises sum over all m of sum_m / N: every loss token weighs the same, however the global batch is
split into micro-batches and DP ranks, and the logged loss (DeepSpeed's average of loss_m over micro-batches and
ranks) is that same per-token mean. N is known before the step from the labels: the step's gas micro-batches are
read ahead, their loss tokens counted, and the count summed over the DP group (one all-reduce of one number per
step, on the ranks that read data: the first and last pipeline stages, whose DP peers run the same schedule).

Pretraining (every label counts): N = gas * dp * micro * seq, so d = micro * seq exactly, the very divisor of
the per-micro-batch mean, and losses and gradients stay bit-identical to it. A step whose labels are all -100
has N = 0: d is then 1 and the loss 0 (nothing to learn), as before.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional

import torch

from megatron.data.data_utils import DataExhaustedError

IGNORE_INDEX = -100


def lm_batches(loader, eod_mask_id: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) pairs, one per batch of `loader`.

    The datasets are sized for the whole run, so running out means that sizing is wrong: DataExhaustedError
    then, rather than starting the loader again, which would silently repeat samples (and spin forever on an
    empty loader).

    With label datasets (SFT) the targets are the batch's "labels", shifted like the tokens: -100 there (the
    prompt, in chat data; padding in packed samples) takes no loss.

    eod_mask_id (eod_mask_loss): positions whose input token is this EOD id get label -100, which the loss
    ignores: the token after a document's end is not predicted from that document. Document ids for
    reset_position_ids / reset_attention_mask are computed by the model's embedding stage from the inputs."""
    served = 0
    for batch in loader:
        tokens = batch["tokens"]
        targets = batch.get("labels", tokens)
        inputs, labels = tokens[:, :-1].contiguous(), targets[:, 1:].contiguous()
        if eod_mask_id is not None:
            labels = labels.masked_fill(inputs.eq(eod_mask_id), IGNORE_INDEX)
        served += 1
        yield inputs, labels
    raise DataExhaustedError.for_loader(loader, served)


class GlobalTokenBatches:
    """(inputs, (labels, divisor)) per micro-batch; see the module docstring. `loss_tokens` is the last step's N
    and `label_positions` its count of label positions (global batch x seq_length), for the log."""

    def __init__(self, batches: Iterator, micro_batches_per_step: int, dp_size: int, dp_group=None) -> None:
        self.batches = batches
        self.gas, self.dp, self.dp_group = micro_batches_per_step, dp_size, dp_group
        self.device = torch.device("cpu")
        if dp_size > 1 and torch.distributed.get_backend(dp_group) == "nccl":  # NCCL reduces GPU tensors only
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pending: deque = deque()
        self.loss_tokens = 0
        self.label_positions = 0

    def __iter__(self) -> "GlobalTokenBatches":
        return self

    def __next__(self):
        if not self.pending:
            self._read_step()
        return self.pending.popleft()

    def _read_step(self) -> None:
        step = [next(self.batches) for _ in range(self.gas)]
        counts = torch.tensor([sum(int(labels.ne(IGNORE_INDEX).sum()) for _, labels in step),
                               sum(labels.numel() for _, labels in step)], dtype=torch.int64, device=self.device)
        if self.dp > 1:
            torch.distributed.all_reduce(counts, group=self.dp_group)
        self.loss_tokens, self.label_positions = (int(v) for v in counts.tolist())
        # A Python float: exact for pretraining, where N is a multiple of gas * dp.
        divisor = torch.tensor(max(self.loss_tokens, 1) / (self.gas * self.dp), dtype=torch.float32)
        self.pending.extend((inputs, (labels, divisor)) for inputs, labels in step)

