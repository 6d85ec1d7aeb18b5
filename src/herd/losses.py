"""The training losses of the heads, with the reference's conventions (-100 is ignored)."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


# What trainers pass to a causal LM's forward for its loss (transformers' loss kwargs).
CAUSAL_LM_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   num_items_in_batch: int | torch.Tensor | None = None,
                   shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy: logits at position t predict labels at t + 1 (or `shift_labels` at
    t, already shifted). With `num_items_in_batch` (a trainer accumulating gradients over several
    batches) the sum over the batch's tokens divided by it, else the mean."""
    if shift_labels is None:
        # Shift by padding the labels on the right, so logits keep their length.
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                       shift_labels.reshape(-1).to(logits.device), ignore_index=ignore_index,
                                       reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


def sequence_classification_loss(pooled_logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(pooled_logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(pooled_logits.squeeze(), labels.squeeze())
        return nn.functional.mse_loss(pooled_logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(pooled_logits.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return nn.functional.binary_cross_entropy_with_logits(pooled_logits, labels)


def question_answering_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Mean of start and end cross entropies; positions outside the sequence are ignored."""
    ignored = start_logits.shape[1]
    losses = []
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        if positions.dim() > 1:
            positions = positions.squeeze(-1)
        positions = positions.to(logits.device).clamp(0, ignored)
        losses.append(nn.functional.cross_entropy(logits, positions, ignore_index=ignored))
    return (losses[0] + losses[1]) / 2


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )
