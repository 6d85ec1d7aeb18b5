"""The decode kernels compile for a Hopper GPU (sm_90) with every flag combination the model uses.

Triton's interpreter (what the other CPU tests run) does not type-check a kernel as the compiler
does: a loop-carried value that changes shape passes there and fails on the GPU. These tests run
the real compiler, down to the cubin with the wheel's ptxas, with no GPU. The compiler must not
see TRITON_INTERPRET (tests/conftest.py sets it), so the compiling runs in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_ALL = textwrap.dedent('''
    import itertools, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from herd.kernels import decode_attention, expert_gemv, fp8_matmul, gemv, paged_attention

    HOPPER = GPUTarget("cuda", 90, 32)
    jobs = []  # compiled at the end by a pool of processes: one compile is about a second of one core

    def compile_one(label, kernel, signature, constants, **options):
        jobs.append((label, kernel, signature, constants, options))

    def compile_job(index):
        label, kernel, signature, constants, options = jobs[index]
        signature = {**signature, **{name: "constexpr" for name in constants}}
        constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=HOPPER,
                                      options=options)
            return [label, "ok", bool(getattr(compiled.metadata, "launch_pdl", False))]
        except Exception as error:
            return [label, f"{type(error).__name__}: {str(error)[-600:]}", None]

    gemv_signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "scale_ptr": "*bf16", "offset_ptr": "*bf16",
                      "out_ptr": "*bf16", "residual_ptr": "*bf16",
                      "norm_w_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "keys_ptr": "*bf16",
                      "values_ptr": "*bf16", "slot_ptr": "*i64", "per_row_slot": "i32", "rows": "i32", "N": "i32", "K": "i32", "eps": "fp32",
                      "q_rows": "i32", "kv_rows": "i32", "slots": "i32"}
    # (norm, gated, residual, rotary) as the model calls the kernel: q/k/v with rotary, the head,
    # gate/up, o and down
    modes = [(True, False, False, True), (True, False, False, False), (True, True, False, False),
             (False, False, True, False)]
    widths = [(2048, 3072), (4096, 6144), (4096, 14336), (14336, 4096), (8192, 2048), (8192, 28672), (300, 70)]
    for pdl, (norm, gated, residual, rotary), (in_features, out_features), rows in itertools.product(
            [False, True], modes, widths, [1, 4]):
        if not pdl and (in_features, out_features) not in widths[:2]:
            continue  # Hopper launches with PDL; the plain launch (other GPUs) at two widths is enough here
        config = gemv._config(out_features, in_features, gated)
        first_k = min(config.first_k or config.block_k, triton.next_power_of_2(in_features))
        constants = dict(NORM=norm, GATED=gated, RESIDUAL=residual, ROTARY=rotary, HEAD_DIM=128 if rotary else 2,
                         QUANT=0, GROUP=1, FRACTIONS=False, PDL=pdl, ROWS=rows, PERSISTENT=False, BLOCK_N=config.block_n,
                         BLOCK_K=config.block_k, FIRST_K=first_k)
        compile_one(f"gemv pdl={pdl} norm={norm} gated={gated} residual={residual} rotary={rotary} "
                    f"{in_features}->{out_features} rows={rows}",
                    gemv._few_row_linear_kernel, gemv_signature, constants, num_warps=config.warps,
                    num_stages=config.stages, launch_pdl=pdl)

    # the persistent loop (whole rows in the first read)
    for (norm, gated, residual, rotary), (in_features, out_features, block_n, warps) in itertools.product(
            modes, [(2048, 3072, 4, 4), (8192, 2048, 2, 8)]):
        constants = dict(NORM=norm, GATED=gated, RESIDUAL=residual, ROTARY=rotary, HEAD_DIM=64 if rotary else 2,
                         QUANT=0, GROUP=1, FRACTIONS=False, PDL=True, ROWS=1, PERSISTENT=True, BLOCK_N=block_n,
                         BLOCK_K=2048,
                         FIRST_K=in_features)
        compile_one(f"gemv pdl=True persistent norm={norm} gated={gated} residual={residual} rotary={rotary} "
                    f"{in_features}->{out_features}", gemv._few_row_linear_kernel, gemv_signature, constants,
                    num_warps=warps, num_stages=1, launch_pdl=True)

    # quantized weights (gemv.QuantizedWeight): int8 and FP8 rows with a float32 scale, int4 in groups; a row
    # longer than the first read, the 1B's persistent gate/up and down (rows=4), and one of each mode with rows=1
    formats = {"int8": ("*i8", "*fp32", 1, 1, 8), "fp8": ("*fp8e4nv", "*fp32", 1, 1, 8),
               "int4/32": ("*u8", "*bf16", 2, 32, 4), "int4/128": ("*u8", "*bf16", 2, 128, 4)}
    # every epilogue over a row longer than the first read; the 1B's gate/up (gated) and down (with the
    # residual) widths, where int4 takes the persistent loop, which gets every epilogue. (Each quantized
    # compile takes seconds: the full product of modes and widths doubled the test's time in CI's cold cache.)
    gated_mode, residual_mode = modes[2], modes[3]
    quantized = list(itertools.product(formats, modes, [(14336, 4096)], [4]))
    quantized += [(name, gated_mode, (2048, 8192), 4) for name in formats]
    quantized += [(name, mode, (8192, 2048), 4) for name in formats
                  for mode in (modes if name.startswith("int4") else [residual_mode])]
    quantized += list(itertools.product(["int4/32"], modes, [(4096, 6144)], [1]))
    for name, (norm, gated, residual, rotary), (in_features, out_features), rows in quantized:
        data, scale, quant, group, bits = formats[name]
        config = gemv._config(out_features, in_features, gated, bits)
        first_k = min(config.first_k or config.block_k, triton.next_power_of_2(in_features))
        persistent = bool(config.programs_per_sm) and first_k >= in_features
        constants = dict(NORM=norm, GATED=gated, RESIDUAL=residual, ROTARY=rotary, HEAD_DIM=128 if rotary else 2,
                         QUANT=quant, GROUP=group, FRACTIONS=True, PDL=True, ROWS=rows, PERSISTENT=persistent,
                         BLOCK_N=config.block_n,
                         BLOCK_K=config.block_k, FIRST_K=first_k)
        signature = {**gemv_signature, "w_ptr": data, "scale_ptr": scale, "offset_ptr": scale}
        compile_one(f"gemv pdl=True {name} persistent={persistent} norm={norm} gated={gated} residual={residual} "
                    f"rotary={rotary} {in_features}->{out_features} rows={rows}",
                    gemv._few_row_linear_kernel, signature, constants, num_warps=config.warps,
                    num_stages=config.stages, launch_pdl=True)

    attention_signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "k_scale_ptr": "*bf16",
                           "v_scale_ptr": "*bf16", "allowed_ptr": "*i1",
                           "new_slot_ptr": "*i64", "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
                           "part_sum_ptr": "*fp32", "kv_heads": "i32", "slots": "i32", "slots_per_split": "i32",
                           "scaling": "fp32"}
    for pdl, splits, group, dim in [(True, 16, 4, 128), (False, 1, 8, 64), (True, 4, 5, 128), (True, 8, 4, 64)]:
        constants = dict(GROUP=group, GROUP_PAD=16, DIM=dim, SPLITS=splits, BLOCK=decode_attention.plan_block(dim),
                         PRECISION="tf32", PDL=pdl, FP8=False, SCALED=False)
        compile_one(f"attention pdl={pdl} splits={splits} group={group} dim={dim}",
                    decode_attention._attend_range_kernel, attention_signature, constants, num_warps=4,
                    num_stages=2, launch_pdl=pdl)
        # the FP8 KV cache: e4m3 keys/values, float32 scales per slot (applied per slot: a bf16 query)
        fp8_signature = {**attention_signature, "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "k_scale_ptr": "*fp32",
                         "v_scale_ptr": "*fp32"}
        compile_one(f"attention fp8 cache pdl={pdl} splits={splits} group={group} dim={dim}",
                    decode_attention._attend_range_kernel, fp8_signature, {**constants, "FP8": True, "SCALED": True},
                    num_warps=4, num_stages=2, launch_pdl=pdl)
        if splits > 1:
            compile_one(f"merge pdl={pdl} splits={splits}", decode_attention._merge_ranges_kernel,
                        {"part_out_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "out_ptr": "*bf16"},
                        dict(SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), DIM=dim, PDL=pdl),
                        num_warps=4, launch_pdl=pdl)
    # attention through a block table (the server's paged store)
    paged_signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "k_scale_ptr": "*bf16",
                       "v_scale_ptr": "*bf16", "table_ptr": "*i32", "first_ptr": "*i64",
                       "length_ptr": "*i64", "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
                       "part_sum_ptr": "*fp32", "kv_heads": "i32", "slots": "i32", "table_width": "i32",
                       "block_size": "i32", "scaling": "fp32"}
    for splits, group, dim in [(1, 4, 128), (8, 4, 128), (2, 5, 64)]:
        constants = dict(GROUP=group, GROUP_PAD=16, DIM=dim, SPLITS=splits, BLOCK=decode_attention.plan_block(dim),
                         PRECISION="tf32", FP8=False, SCALED=False)
        compile_one(f"paged attention splits={splits} group={group} dim={dim}", paged_attention._paged_range_kernel,
                    paged_signature, constants, num_warps=4, num_stages=2)
        # the FP8 KV cache in the server's pools (herd serve --kv-cache-dtype fp8): e4m3, float32 scales per slot
        fp8_signature = {**paged_signature, "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "k_scale_ptr": "*fp32",
                         "v_scale_ptr": "*fp32"}
        block = decode_attention.plan_block(dim) * (2 if dim > 64 else 1)  # as the launch plans FP8 pools
        compile_one(f"paged attention fp8 cache splits={splits} group={group} dim={dim}",
                    paged_attention._paged_range_kernel, fp8_signature,
                    {**constants, "FP8": True, "SCALED": True, "BLOCK": block}, num_warps=4, num_stages=2)
    # routed experts read as stored (int8 / FP8 data with float32 scales, int4 pairs with scales and
    # offsets in the rows' dtype), rows in each activation dtype; FP8 into bf16 products through inline asm
    for (data, data_name), x in itertools.product([("*i8", "int8"), ("*fp8e4nv", "fp8"), ("*u8", "int4")],
                                                  ["*bf16", "*fp16", "*fp32"]):
        int4 = data_name == "int4"
        scale = x if int4 else "*fp32"
        compile_one(f"expert_gemv {data_name} x={x}", expert_gemv._expert_gemv_kernel,
                    {"x_ptr": x, "ids_ptr": "*i64", "data_ptr": data, "scale_ptr": scale, "offset_ptr": scale,
                     "partial_ptr": "*fp32", "pairs": "i32", "K": "i32", "N": "i32", "steps_per_range": "i32"},
                    dict(INT4=int4, SCALED=True, GROUP=128 if int4 else 1, FP8_ASM=data_name == "fp8" and x == "*bf16",
                         PRECISION="ieee" if x == "*fp32" else "tf32", TENSOR_CORES=True, SUMS_BY_DOT=False,
                         BLOCK_N=expert_gemv.BLOCK_N,
                         BLOCK_K=128 if int4 else expert_gemv.BLOCK_K, M=16),
                    num_warps=expert_gemv.WARPS, num_stages=expert_gemv.INT4_STAGES if int4 else expert_gemv.STAGES)
    compile_one("expert_gemv int4 sums by dot", expert_gemv._expert_gemv_kernel,  # a variant the sweep measures
                {"x_ptr": "*bf16", "ids_ptr": "*i64", "data_ptr": "*u8", "scale_ptr": "*bf16", "offset_ptr": "*bf16",
                 "partial_ptr": "*fp32", "pairs": "i32", "K": "i32", "N": "i32", "steps_per_range": "i32"},
                dict(INT4=True, SCALED=True, GROUP=128, FP8_ASM=False, PRECISION="tf32", TENSOR_CORES=True, SUMS_BY_DOT=True,
                     BLOCK_N=expert_gemv.BLOCK_N, BLOCK_K=128, M=16),
                num_warps=expert_gemv.WARPS, num_stages=expert_gemv.INT4_STAGES)
    for data, data_name in [("*i8", "int8"), ("*fp8e4nv", "fp8")]:  # the CUDA-core variant the sweep measures
        compile_one(f"expert_gemv {data_name} cuda cores", expert_gemv._expert_gemv_kernel,
                    {"x_ptr": "*bf16", "ids_ptr": "*i64", "data_ptr": data, "scale_ptr": "*fp32", "offset_ptr": "*fp32",
                     "partial_ptr": "*fp32", "pairs": "i32", "K": "i32", "N": "i32", "steps_per_range": "i32"},
                    dict(INT4=False, SCALED=True, GROUP=1, FP8_ASM=False, PRECISION="tf32", TENSOR_CORES=False,
                         SUMS_BY_DOT=False, BLOCK_N=expert_gemv.BLOCK_N, BLOCK_K=expert_gemv.BLOCK_K, M=16),
                    num_warps=expert_gemv.WARPS, num_stages=expert_gemv.STAGES)
    for x in ["*bf16", "*fp16", "*fp32"]:  # unquantized experts in the rows' dtype: no scale (data read as scale_ptr)
        compile_one(f"expert_gemv float x={x}", expert_gemv._expert_gemv_kernel,
                    {"x_ptr": x, "ids_ptr": "*i64", "data_ptr": x, "scale_ptr": x, "offset_ptr": x,
                     "partial_ptr": "*fp32", "pairs": "i32", "K": "i32", "N": "i32", "steps_per_range": "i32"},
                    dict(INT4=False, SCALED=False, GROUP=1, FP8_ASM=False, PRECISION="ieee" if x == "*fp32" else "tf32",
                         TENSOR_CORES=True, SUMS_BY_DOT=False, BLOCK_N=expert_gemv.BLOCK_N, BLOCK_K=expert_gemv.BLOCK_K,
                         M=16),
                    num_warps=expert_gemv.WARPS, num_stages=expert_gemv.STAGES)
    for block_m, pdl in itertools.product([16, 32, 64], [False, True]):  # FP8 rows 5-64 on the tensor cores
        compile_one(f"fp8 rows {block_m} pdl={pdl}", fp8_matmul._fp8_rows_kernel,
                    {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "partial_ptr": "*fp32", "rows": "i32", "N": "i32",
                     "K": "i32", "K_PER_SPLIT": "i32"},
                    dict(BLOCK_M=block_m, BLOCK_N=fp8_matmul.BLOCK_N, BLOCK_K=fp8_matmul.BLOCK_K,
                         PRECISE_COLUMNS=fp8_matmul.PRECISE_COLUMNS, PDL=pdl, INTERPRETED=False),
                    num_warps=fp8_matmul.WARPS, num_stages=fp8_matmul.STAGES, launch_pdl=pdl)
    import multiprocessing, os
    # widths that pick the same configuration are the same compiled kernel: each is compiled once
    def same_kernel(job):
        _, kernel, *parts = job
        return (kernel.fn.__name__, *(tuple(sorted(part.items())) for part in parts))

    first_of = {}
    for index, job in enumerate(jobs):
        first_of.setdefault(same_kernel(job), index)
    unique = sorted(set(first_of.values()))
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:  # forked: the jobs list is shared
        outcome = dict(zip(unique, pool.map(compile_job, unique, chunksize=1)))
    results = [[job[0], *outcome[first_of[same_kernel(job)]][1:]] for job in jobs]
    json.dump(results, sys.stdout)
''')


@pytest.fixture(scope="module")
def compiled():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, env=env, timeout=900)
    if run.returncode != 0:
        if "GPUTarget" in run.stderr or "ASTSource" in run.stderr:
            pytest.skip("this Triton has no ahead-of-time compile entry points")
        raise AssertionError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_decode_kernel_variant_compiles_for_hopper(compiled):
    failures = [f"{label}: {status}" for label, status, _ in compiled if status != "ok"]
    assert not failures, "\n".join(failures)
    # the gemv grid (4 x 7 x 2 with PDL, 4 x 2 x 2 without), 8 persistent, 34 quantized (4 x 4 + 4 + 2 x 4 + 2
    # + 4), the attention kernels, 3 paged attention kernels and their 3 FP8 ones, 15 expert_gemv
    assert len(compiled) >= 133
    assert sum("persistent=True" in label and ("int" in label or "fp8" in label) for label, _, _ in compiled) >= 8
    assert sum(label.startswith("paged attention") for label, _, _ in compiled) == 6
    assert sum(label.startswith("paged attention fp8 cache") for label, _, _ in compiled) == 3
    assert sum(label.startswith("expert_gemv") for label, _, _ in compiled) == 15
    assert sum(label.startswith("attention fp8 cache") for label, _, _ in compiled) == 4
    assert sum(label.startswith("fp8 rows") for label, _, _ in compiled) == 6


def test_programmatic_launch_is_compiled_in_when_asked(compiled):
    for label, status, launch_pdl in compiled:
        assert launch_pdl == ("pdl=True" in label), label
