// multi_expert_gemv_wide.cu: the fused decode GEMV with the wide delta items
// of gemv_wide.cuh (16 code bytes per lane and row: 128/256/512-column items
// for INT4/INT2/INT1); base pass, salient items and epilogue as in
// multi_expert_gemv.cu. Requires in_features % (512/bits) == 0.
// UNVERIFIED ON A GPU (compiled and ptxas-checked only).
// Entry points meswitch_multi_expert_gemv_wide_b{1,2,4}_g{32,64,128,row}_t{1,2,4,8}.
#include "gemv_core.cuh"

MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_multi_expert_gemv_wide_b, 1, true)
MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_multi_expert_gemv_wide_b, 2, true)
MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_multi_expert_gemv_wide_b, 4, true)
