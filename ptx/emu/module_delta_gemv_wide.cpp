// Host emulation of ptx/kernels/delta_gemv_wide.cu (see simt.h).
#include <cuda_fp16.h>

#include "delta_gemv_wide.cu"
#include "gemv_module.h"

MESWITCH_EMU_GEMV_MODULE(delta_gemv_wide,
    MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_delta_gemv_wide_b, 1, false)
    MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_delta_gemv_wide_b, 2, false)
    MESWITCH_GEMV_WIDE_ALL_GROUPS(meswitch_delta_gemv_wide_b, 4, false))
