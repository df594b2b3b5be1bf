// multi_expert_gemv.cu: fused decode GEMV, y = x·W_baseᵀ + x·Δ̂_{e(b)}ᵀ per
// batch row, FP16 in/out, FP32 accumulation. The algorithm and its data
// layouts are in gemv_core.cuh; this file only instantiates the variants
// meswitch_multi_expert_gemv_b{1,2,4}_g{32,64,128,row}_t{1,2,4,8}.
#include "gemv_core.cuh"

MESWITCH_GEMV_ALL_GROUPS(meswitch_multi_expert_gemv_b, 1, true)
MESWITCH_GEMV_ALL_GROUPS(meswitch_multi_expert_gemv_b, 2, true)
MESWITCH_GEMV_ALL_GROUPS(meswitch_multi_expert_gemv_b, 4, true)
