"""Running a model on more than one device, applied from outside the model code: device-map
placement and offload (device_map.py, offload.py), tensor parallel (tensor_parallel.py) by the
families' plans (plans.py)."""


from .tensor_parallel import (TensorParallel, VocabParallelEmbedding, VocabParallelHead, gather_logits, reduce_group,
                              same_tokens_on_every_rank, tensor_parallel_of)

__all__ = ["TensorParallel", "VocabParallelEmbedding", "VocabParallelHead", "gather_logits", "reduce_group",
           "same_tokens_on_every_rank", "tensor_parallel_of"]
