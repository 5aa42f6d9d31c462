"""The input embedding table in host memory (``performance.host_embeddings``).

The table is frozen and a pass reads only the rows of its tokens, so it need not sit on the GPU: it stays in host
memory, the rows are gathered there into pinned memory and copied to the GPU without blocking (on the compute
stream, so the first layer reads them once they are there). That frees vocab × hidden × 2 bytes of GPU memory
(1.05 GB for Llama-3.1-8B, 1.09 GB for Qwen2.5-7B) for a copy of tokens × hidden × 2 bytes a pass (128 MiB at
16,384 tokens of Llama-3.1-8B). A table tied to the output layer stays where it is: the output layer needs it on
the GPU. Jobs of several ranks keep it on the GPU too: FSDP2 shards it with the rest, and DistributedDataParallel
refuses a model whose parameters are on two kinds of device (``engine/run.py``).
"""

from __future__ import annotations

from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """Where the model computes: the device of its first parameter not in host memory (the CPU when all are)."""
    for param in model.parameters():
        if param.device.type != "cpu":
            return param.device
    return torch.device("cpu")


def embeddings_are_tied(model: Any) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and inputs.weight.data_ptr() == outputs.weight.data_ptr()


class HostEmbeddingLookup:
    """The forward of an embedding module whose table is in host memory: the token ids come to the host, the rows
    are looked up there and go back to ``device``. A plain ``nn.Embedding`` gathers straight into pinned memory;
    any other embedding class (one that scales its rows, say) runs its own forward on the host first."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.original = module.forward
        self.plain = type(module) is torch.nn.Embedding and module.max_norm is None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        pinned = self.device.type == "cuda"
        if self.plain:
            weight = self.module.weight
            rows = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=pinned)
            torch.index_select(weight, 0, ids.reshape(-1), out=rows)
            rows = rows.view(*ids.shape, weight.shape[1])
        else:
            rows = self.original(ids)
            rows = rows.pin_memory() if pinned else rows
        return rows.to(self.device, non_blocking=pinned)


def keep_embeddings_on_host(model: Any, device: torch.device) -> tuple[bool, str]:
    """Move the input embedding table to host memory and look it up there; returns whether it moved and a line
    for the job log (why it stayed, where it could not move)."""
    if embeddings_are_tied(model):
        return False, ("host embeddings off: the input embeddings are tied to the output layer, which needs them on "
                       "the GPU")
    module = model.get_input_embeddings()
    if any(param.requires_grad for param in module.parameters()):
        return False, "host embeddings off: the input embeddings are trained (a LoRA target)"
    size = module.weight.numel() * module.weight.element_size()
    module.to("cpu")
    module.forward = HostEmbeddingLookup(module, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return True, f"host embeddings: the input embedding table ({size / 1e9:.2f} GB) is in host memory"
