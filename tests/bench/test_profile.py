"""The profile's categories and its run on the CPU (the GPU profile is run on the lent H100)."""

from __future__ import annotations

import pytest

from usf_bios.bench.profile import category, format_summary, idle_gaps, profile_config, summarize_kernels
from usf_bios.spec import Performance


@pytest.mark.parametrize("name,expected", [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("_rms_norm_forward_kernel", "norm/rope/swiglu"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, AUnaryFunctor<mul>>", "elementwise"),
    ("aten::logsumexp", "loss"),
    ("aten::mm", "matmul"),
    ("something_else", "other"),
])
def test_kernel_categories(name, expected):
    assert category(name) == expected


def test_summary_adds_up_and_ranks():
    summary = summarize_kernels([("aten::mm", 3.0), ("flash_fwd", 1.0), ("aten::mm", 1.0), ("x", 1.0)], wall_seconds=8.0)
    assert summary["busy_seconds"] == 6.0 and summary["busy_share_of_wall"] == 0.75
    assert list(summary["categories"]) == ["matmul", "attention", "other"]
    assert summary["categories"]["matmul"] == {"seconds": 4.0, "share": pytest.approx(0.6667, abs=1e-4)}
    assert summary["top_kernels"][0] == {"name": "aten::mm", "seconds": 4.0, "category": "matmul"}


def test_idle_gaps_merge_overlapping_kernels_and_name_the_host_code_in_the_largest():
    kernels = [("a", 0, 100), ("b", 50, 300), ("c", 350, 400),        # b overlaps a: the first gap is 300 → 350
               ("d", 2_400, 2_500), ("e", 2_500, 2_600), ("f", 20_600, 20_700)]
    host = [("step", 0, 30_000), ("collate", 500, 2_000), ("aten::tensor", 1_000, 1_500), ("log", 10_000, 20_000)]
    idle = idle_gaps(kernels, host)
    assert idle["idle_seconds"] == pytest.approx((50 + 2_000 + 18_000) / 1e6, abs=1e-4)
    assert idle["gaps"]["0-0.1 ms"]["count"] == 1
    assert idle["gaps"]["1-10 ms"]["count"] == 1 and idle["gaps"][">= 10 ms"]["count"] == 1
    assert idle["gaps"]["0.1-1 ms"]["count"] == 0
    largest = idle["largest"]
    assert [g["ms"] for g in largest] == [18.0, 2.0, 0.05]
    assert largest[0]["after_kernel"] == "e" and largest[0]["before_kernel"] == "f" and largest[0]["host"] == ["step", "log"]
    assert largest[1]["host"] == ["step", "collate", "aten::tensor"]


def test_profile_runs_our_side_on_the_cpu():
    summary = profile_config("tiny-llama-lora-fp32-256", Performance(), record_steps=2)
    assert summary["device"] == "cpu" and summary["recorded_steps"] == 2
    assert summary["categories"]["matmul"]["seconds"] > 0
    assert 0 < summary["wall_seconds"] and summary["tokens_per_second"] > 0
    assert "matmul" in format_summary(summary)
