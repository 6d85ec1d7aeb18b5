"""Running one model on several devices: tensor parallel (tensor_parallel.py) by the families'
plans (plans.py), applied from outside the model."""

from .tensor_parallel import (TensorParallel, VocabParallelEmbedding, VocabParallelHead, gather_logits, reduce_group,
                              same_tokens_on_every_rank, tensor_parallel_of)

__all__ = ["TensorParallel", "VocabParallelEmbedding", "VocabParallelHead", "gather_logits", "reduce_group",
           "same_tokens_on_every_rank", "tensor_parallel_of"]
