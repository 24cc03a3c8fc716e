"""Launch plans of the block-sparse kernels: every tiling variant (key/query blocks gathered per
step, blocks split into row tiles) against the float64 reference under the interpreter; the
shared-memory model against what Triton asked for on an H100; the capability limit; retries.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels.block_sparse import BlockSparseInputError
from attnrt.kernels.block_sparse import launch as bs_launch
from attnrt.kernels.block_sparse import options as bs_options
from attnrt.kernels.block_sparse.options import Plan
from tests.kernels.test_block_sparse_kernel import _check, nan_buffers  # noqa: F401 - fixture

H100_SMEM = 232448

# What Triton 3.6 asked for on an H100 (results/run1, the plans of the previous commit):
# (kernel, block_q, block_k, D, element size, num_warps, num_stages, bytes required).
H100_REQUIRED = [
    ("dq", 128, 128, 64, 4, 8, 3, 262144),
    ("dq", 128, 128, 128, 2, 8, 3, 262144),
    ("dq", 128, 64, 128, 4, 4, 3, 294912),
    ("dq", 64, 64, 256, 4, 8, 1, 262144),
    ("fwd", 64, 128, 128, 4, 4, 3, 327680),
    ("fwd", 128, 128, 128, 4, 8, 3, 393216),
]

# Plans Triton 3.6 refused (OutOfResources) and ran on an H100, from the gpu tests and the plan
# sweep of bench/NOTES-sparse.md run 3: (kernel, block, D, element size, warps, stages, step,
# split). A gathered forward tile (step > 1) took a K/V buffer per stage.
H100_REFUSED = [("fwd", 64, 128, 2, 4, 2, 4, 1), ("fwd", 128, 128, 2, 4, 2, 2, 1),
                ("fwd", 128, 128, 2, 4, 2, 2, 2)]
H100_RAN = [("fwd", 64, 128, 2, 4, 3, 2, 1), ("fwd", 64, 128, 2, 8, 3, 2, 1),
            ("fwd", 128, 128, 2, 4, 3, 1, 1), ("dq", 64, 128, 2, 4, 3, 2, 1),
            ("dkdv", 64, 128, 2, 4, 3, 2, 1), ("dq", 128, 128, 2, 8, 2, 1, 1)]


def _force(monkeypatch: pytest.MonkeyPatch, bq: int, bk: int, d: int, **plans: Plan) -> None:
    table = {bs_options.key(kernel, bq, bk, d): {"num_warps": 4, "num_stages": 1,
                                                 "step": p.step, "split": p.split,
                                                 "rows_split": p.rows_split}
             for kernel, p in plans.items()}
    monkeypatch.setattr(bs_options, "LAUNCH_OPTIONS", table)


# (B, N, M, H, Hkv, D, block_q, block_k, density): GQA, tails, a query block visiting nothing.
SHAPE = (2, 70, 90, 2, 1, 16, 32, 32, 0.5)
VARIANTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]


@pytest.mark.interpret
@pytest.mark.parametrize(("step", "split"), VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("valid", [False, True])
def test_every_variant_matches_reference(monkeypatch, step, split, valid):
    plan = Plan(4, 1, step, split)
    _force(monkeypatch, 32, 32, 16, fwd=plan, dq=plan, dkdv=plan)
    _check(SHAPE, torch.float32, valid=valid, seed=11)


@pytest.mark.interpret
@pytest.mark.parametrize(("rows_split", "split"), [(2, 1), (2, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("valid", [False, True])
def test_dkdv_rows_split_matches_reference(monkeypatch, rows_split, split, valid):
    """dK/dV taking each visiting 32-row query block in 16-row steps (with split key tiles
    too), GQA, tails and a query block that visits nothing, against the float64 reference."""
    _force(monkeypatch, 32, 32, 16, fwd=Plan(4, 1), dq=Plan(4, 1),
           dkdv=Plan(4, 1, 1, split, rows_split))
    _check(SHAPE, torch.float32, valid=valid, seed=12)


def test_rows_split_plans_are_dkdv_one_block_a_step_only(monkeypatch):
    assert bs_options.valid_plan("dkdv", Plan(4, 2, 1, 1, 4), 128, 64)
    assert not bs_options.valid_plan("fwd", Plan(4, 2, 1, 1, 2), 128, 64)
    assert not bs_options.valid_plan("dq", Plan(4, 2, 1, 1, 2), 128, 64)
    assert not bs_options.valid_plan("dkdv", Plan(4, 2, 2, 1, 2), 64, 64)  # gathered steps
    assert not bs_options.valid_plan("dkdv", Plan(4, 2, 1, 1, 8), 64, 64)  # 8-row steps
    assert not bs_options.valid_plan("dkdv", Plan(4, 2, 1, 1, 3), 96, 64)  # not a power of 2
    # The default takes 128-row query blocks 32 rows a step (no register spills on sm90).
    assert bs_options.default_plan("dkdv", 128, 64, 128).rows_split == 4
    assert bs_options.default_plan("dkdv", 64, 64, 128).rows_split == 1
    monkeypatch.setattr(bs_options, "LAUNCH_OPTIONS", {"fwd-64x64-d16": {
        "num_warps": 4, "num_stages": 1, "rows_split": 2}})
    with pytest.raises(BlockSparseInputError, match="rows_split"):
        bs_options.wanted_plan("fwd", 64, 64, 16)
    # Its shared memory counts a step's rows, not the whole block's.
    full = bs_options.smem_bytes("dkdv", Plan(8, 2), 128, 128, 128, 2)
    assert bs_options.smem_bytes("dkdv", Plan(8, 2, 1, 1, 4), 128, 128, 128, 2) < full


@pytest.mark.interpret
def test_variants_mix_across_kernels_and_unequal_blocks(monkeypatch):
    _force(monkeypatch, 32, 16, 16, fwd=Plan(4, 1, 4, 2), dq=Plan(4, 1, 2, 1),
           dkdv=Plan(4, 1, 1, 1))
    _check((1, 64, 75, 2, 2, 24, 32, 16, 0.6), torch.float16, valid=True, seed=4)
    _force(monkeypatch, 16, 32, 16, fwd=Plan(4, 1, 1, 1), dq=Plan(4, 1, 1, 1),
           dkdv=Plan(4, 1, 4, 2))
    _check((1, 64, 75, 2, 2, 24, 16, 32, 0.6), torch.float16, valid=True, seed=5)


def test_model_bounds_what_triton_asked_for():
    for kernel, bq, bk, d, es, warps, stages, required in H100_REQUIRED:
        got = bs_options.smem_bytes(kernel, Plan(warps, stages), bq, bk, d, es)
        assert got >= required, (kernel, bq, bk, d, es, got, required)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_every_gpu_test_size_fits_an_h100(dtype):
    for d in (64, 128):
        for bq in (64, 128):
            for bk in (64, 128):
                for kernel in bs_options.KERNELS:
                    plans = bs_options.fitting_plans(kernel, bq, bk, d, dtype, H100_SMEM)
                    assert plans, (kernel, bq, bk, d, dtype)
                    es = torch.empty((), dtype=dtype).element_size()
                    assert bs_options.smem_bytes(kernel, plans[0], bq, bk, d, es) <= H100_SMEM


@pytest.mark.parametrize(("kernel", "block", "d", "es", "warps", "stages", "step", "split"),
                         H100_REFUSED)
def test_model_refuses_what_triton_refused(kernel, block, d, es, warps, stages, step, split):
    plan = Plan(warps, stages, step, split)
    assert bs_options.smem_bytes(kernel, plan, block, block, d, es) > H100_SMEM


@pytest.mark.parametrize(("kernel", "block", "d", "es", "warps", "stages", "step", "split"),
                         H100_RAN)
def test_model_keeps_what_triton_ran(kernel, block, d, es, warps, stages, step, split):
    plan = Plan(warps, stages, step, split)
    assert bs_options.smem_bytes(kernel, plan, block, block, d, es) <= H100_SMEM


def test_sixteen_bit_plans_keep_their_stages_where_they_fit(monkeypatch):
    monkeypatch.setattr(bs_options, "LAUNCH_OPTIONS", {})  # the default plan, untuned
    plan = bs_options.fitting_plans("fwd", 64, 64, 128, torch.bfloat16, H100_SMEM)[0]
    assert plan == bs_options.default_plan("fwd", 64, 64, 128)
    assert plan.step == 2
    assert plan.num_stages == 3


def test_fitting_reduces_stages_then_step_then_splits():
    plans = bs_options.ladder("dq", Plan(4, 3, 2, 1), 64, 64)
    assert plans[:3] == [Plan(4, 3, 2, 1), Plan(4, 2, 2, 1), Plan(4, 1, 2, 1)]
    assert plans[3:6] == [Plan(4, 3, 1, 1), Plan(4, 2, 1, 1), Plan(4, 1, 1, 1)]
    assert plans[-1] == Plan(4, 1, 1, 4)  # 16-row tiles at the end


def test_sizes_no_plan_fits_are_a_capability_error():
    with pytest.raises(BlockSparseInputError, match=r"block_k=128 with head_size=256 and float32"):
        bs_options.check_fits(("fwd",), 64, 128, 256, torch.float32, H100_SMEM)
    with pytest.raises(BlockSparseInputError, match="backward"):  # the forward fits
        bs_options.check_fits(bs_options.KERNELS, 64, 64, 256, torch.float32, 160_000)
    bs_options.check_fits(("fwd",), 64, 64, 256, torch.float32, 160_000)
    bs_options.check_fits(bs_options.KERNELS, 128, 128, 256, torch.bfloat16, H100_SMEM)
    # dK/dV's 32-row steps (rows_split) fit 128-row blocks in float32 at D=256.
    bs_options.check_fits(bs_options.KERNELS, 128, 64, 256, torch.float32, H100_SMEM)


def test_a_tuned_entry_that_cannot_tile_is_refused(monkeypatch):
    monkeypatch.setattr(bs_options, "LAUNCH_OPTIONS",
                        {"fwd-32x32-d16": {"num_warps": 4, "num_stages": 2, "split": 4}})
    with pytest.raises(BlockSparseInputError, match=r"LAUNCH_OPTIONS\['fwd-32x32-d16'\]"):
        bs_options.wanted_plan("fwd", 32, 32, 16)


def test_a_launch_triton_refuses_moves_to_the_next_plan():
    class Refused(Exception):
        pass

    tried: list[Plan] = []

    def launch(plan: Plan) -> None:
        tried.append(plan)
        if plan.num_stages > 1:
            raise Refused

    plans = [Plan(4, 3), Plan(4, 2), Plan(4, 1), Plan(4, 1, 1, 2)]
    assert bs_launch.first_launching(plans, launch, Refused) == Plan(4, 1)
    assert tried == plans[:3]
    assert bs_launch.first_launching(plans[:2], launch, Refused) is None


@pytest.mark.gpu
@pytest.mark.parametrize(("step", "split"), VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_variants(monkeypatch, step, split, block):
    if block * step > bs_options.MAX_STEP_KEYS:
        pytest.skip("step * block over the gathered-tile limit (refused by valid_plan)")
    plan = Plan(4, 2, step, split)
    table = {bs_options.key(k, block, block, 128): {"num_warps": 4, "num_stages": 2,
                                                     "step": step, "split": split}
             for k in bs_options.KERNELS}
    monkeypatch.setattr(bs_options, "LAUNCH_OPTIONS", table)
    bs_launch.clear_plans()
    _check((1, 1000, 1100, 4, 2, 128, block, block, 0.3), torch.bfloat16, valid=True,
           device="cuda")
    fwd = ("fwd", block, block, 128, torch.bfloat16, torch.cuda.current_device())
    if bs_options.smem_bytes("fwd", plan, block, block, 128, 2) <= H100_SMEM:
        assert bs_launch._CHOSEN[fwd] == plan


@pytest.mark.gpu
def test_gpu_refuses_what_fits_no_plan():
    q = torch.randn(1, 256, 2, 256, device="cuda", requires_grad=True)
    index = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device="cuda")
    count = torch.ones(1, 2, 2, dtype=torch.int32, device="cuda")
    from attnrt.kernels.block_sparse import block_sparse_attention

    with pytest.raises(BlockSparseInputError, match="head_size=256 and float32"):
        block_sparse_attention(q, q, q, index, count, block_q=128, block_k=128)


def test_default_plans_take_a_warpgroup_per_64_rows_of_the_program_s_own_block():
    """4 warps for 64-row tiles, 8 for 128 (measured on the H100: bench/NOTES-sparse.md, run
    3); the own block is the query block for fwd and dq, the key block for dkdv."""
    assert bs_options.default_plan("fwd", 64, 64, 128).num_warps == 4
    assert bs_options.default_plan("fwd", 128, 64, 128).num_warps == 8  # SLA's blocks
    assert bs_options.default_plan("dq", 128, 64, 128).num_warps == 8
    assert bs_options.default_plan("dkdv", 128, 64, 128).num_warps == 4
    assert bs_options.default_plan("dkdv", 64, 128, 128).num_warps == 8
    assert bs_options.default_plan("fwd", 64, 64, 256).num_warps == 8
