"""One rank of the tensor-parallel tests, started by torchrun (test_tensor_parallel.py):
`python -m torch.distributed.run --standalone --nproc-per-node N _tp_worker.py CASES OUT`.

For each case of CASES (a torch.save'd list), the model loads with tp_plan="auto" (this process
joins the group from torchrun's environment, as a user's script does) and records its logits,
greedy tokens on the plain and the fast decoder (uncompiled on the CPU), sampled tokens drawn
with a different seed on each rank (cases that ask), the shapes it holds, which all-reduce its
sums took ("lamport" or "oneshot" over symmetric memory, else why not: symmetric.py), and for FP8 cases the
decode kernels' per-token activation scales of the rank's slice of given rows (traced by dynamo
as the compiled step is); or the error message the load raised. Written to OUT/rank{RANK}.pt for the test to compare with one process.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist


def fp8_activation_probe(model, rows: torch.Tensor, rank: int) -> dict:
    """The FP8 activations and scales the decode kernels' FP8 path (kernels/gemv.py) gives this
    rank's columns of `rows` (rows, whole in features) for o_proj and down_proj of layer 0, as
    their kernel weights say (under tensor parallel: scales reduced across the ranks). Traced by
    dynamo with fullgraph, as the compiled step is (eager backend: no compiler needed)."""
    from herd.kernels import gemv

    def activations(x, weight):
        return gemv.fp8_activation_rows(x, weight.activation_scale_ub, weight.reduce_activation_amax)

    traced = torch.compile(activations, backend="eager", fullgraph=True)
    layer = model.model.layers[0]
    mlp = getattr(layer, "mlp", None) or layer.feed_forward  # Llama's, Llama 4's (a dense layer)
    probed = {}
    for name, linear in (("o_proj", layer.self_attn.o_proj), ("down_proj", mlp.down_proj)):
        local = linear.in_features
        x = rows[:, rank * local:(rank + 1) * local].to(linear.weight.device)  # (rows, local in features)
        data, scale = traced(x.contiguous(), linear.kernel_weight())
        probed[name] = (data.view(torch.uint8).cpu(), scale.cpu())
    return probed


_STARTED = time.monotonic()
_progress_path: str | None = None


def progress(message: str) -> None:
    """A line in OUT/progress-rank{RANK}.txt with the seconds since start: what a test that times
    out reports (which stage a rank was in)."""
    if _progress_path is not None:
        with open(_progress_path, "a") as file:
            file.write(f"{time.monotonic() - _STARTED:7.1f} s  {message}\n")


def run_case(case: dict, rank: int) -> dict:
    import herd
    from herd.quantization import config_from_name
    from herd.decoding import decoders
    from herd.parallel import symmetric, tensor_parallel_of

    progress(f"{case['name']}: loading")
    try:
        quantization = config_from_name(case.get("quantization"))  # a name: the cases file holds no objects
        model = getattr(herd, case["class"]).from_pretrained(case["folder"], tp_plan="auto", progress=False,
                                                             quantization_config=quantization)
    except ValueError as error:
        return {"error": str(error)}
    device = model.device  # cuda:LOCAL_RANK under NCCL
    group_name = tensor_parallel_of(model).group_name
    all_reduce = symmetric.kernel(group_name) or symmetric.why_off(group_name)  # the sums' path
    ids, mask = case["ids"].to(device), case["mask"].to(device)
    forward = {name: value.to(device) for name, value in case.get("forward", {}).items()}
    progress(f"{case['name']}: forward (sums: {all_reduce})")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **forward).logits.cpu()
    progress(f"{case['name']}: plain generate")
    greedy = dict(attention_mask=mask, max_new_tokens=case["new_tokens"], do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    plain = model.generate(ids, disable_compile=True, **greedy)
    decoders.FAST_DEVICES = ("cuda", "cpu")  # the decode plan, uncompiled and uncaptured on the CPU
    progress(f"{case['name']}: fast generate")
    try:
        fast = model.generate(ids, **greedy)
    finally:
        decoders.FAST_DEVICES = ("cuda",)
    sampled = None
    if case["sample"]:
        progress(f"{case['name']}: sampled generate")
        torch.manual_seed(1000 + rank)  # each rank its own draws: rank 0's must win
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0, pad_token_id=0,
                                 eos_token_id=None, disable_compile=True).cpu()
    progress(f"{case['name']}: save_pretrained")
    try:
        model.save_pretrained(os.path.join(case["folder"], f"saved-by-rank{rank}"))
        saved = "saved"
    except ValueError as error:
        saved = str(error)
    probe = fp8_activation_probe(model, case["probe_rows"], rank) if "probe_rows" in case else None
    return {"logits": logits, "plain": plain.cpu(), "fast": fast.cpu(), "sampled": sampled, "save": saved,
            "fp8_probe": probe,
            "shapes": {name: tuple(t.shape) for name, t in model.state_dict().items()},
            "tp_size": model.tp_size, "all_reduce": all_reduce}


def main(cases_path: str, out_dir: str) -> None:
    global _progress_path
    torch.set_num_threads(1)
    cases = torch.load(cases_path, weights_only=True)
    rank = int(os.environ["RANK"])
    _progress_path = os.path.join(out_dir, f"progress-rank{rank}.txt")
    results = {case["name"]: run_case(case, rank) for case in cases}
    progress("done")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
