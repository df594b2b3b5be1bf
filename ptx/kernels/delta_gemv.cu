// delta_gemv.cu: y[b,:] += x[b,:]·Δ̂_{e(b)}ᵀ into an existing FP16 y whose base
// part came from elsewhere (cuBLAS); rows with MESWITCH_NO_EXPERT are left
// untouched. Same core as multi_expert_gemv (gemv_core.cuh) without the base
// pass: meswitch_delta_gemv_b{1,2,4}_g{32,64,128,row}_t{1,2,4,8}.
#include "gemv_core.cuh"

MESWITCH_GEMV_ALL_GROUPS(meswitch_delta_gemv_b, 1, false)
MESWITCH_GEMV_ALL_GROUPS(meswitch_delta_gemv_b, 2, false)
MESWITCH_GEMV_ALL_GROUPS(meswitch_delta_gemv_b, 4, false)
