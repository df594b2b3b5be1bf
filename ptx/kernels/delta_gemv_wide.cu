// delta_gemv_wide.cu: y[b,:] += x[b,:]·Δ̂_{e(b)}ᵀ with the wide delta items of
// gemv_wide.cuh (the delta-only twin of multi_expert_gemv_wide.cu; rows with
// MESWITCH_NO_EXPERT untouched). Requires in_features % (512/bits) == 0.
// UNVERIFIED ON A GPU (compiled and ptxas-checked only).
// Entry points meswitch_delta_gemv_wide_b{1,2,4}_g{32,64,128,row}_t{1,2,4,8}.
#include "gemv_core.cuh"

MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_delta_gemv_wide_b, 1, false)
MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_delta_gemv_wide_b, 2, false)
MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_delta_gemv_wide_b, 4, false)
