// Host emulation of ptx/kernels/multi_expert_gemv_wide.cu (see simt.h).
#include <cuda_fp16.h>

#include "multi_expert_gemv_wide.cu"
#include "gemv_module.h"

MESWITCH_EMU_GEMV_MODULE(multi_expert_gemv_wide,
    MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_multi_expert_gemv_wide_b, 1, true)
    MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_multi_expert_gemv_wide_b, 2, true)
    MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_multi_expert_gemv_wide_b, 4, true))
