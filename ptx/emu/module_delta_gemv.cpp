// Host emulation of ptx/kernels/delta_gemv.cu (see simt.h).
#include <cuda_fp16.h>

#include "delta_gemv.cu"
#include "gemv_module.h"

MESWITCH_EMU_GEMV_MODULE(delta_gemv,
    MESWITCH_GEMV_ALL_GROUPS(meswitch_delta_gemv_b, 1, false)
    MESWITCH_GEMV_ALL_GROUPS(meswitch_delta_gemv_b, 2, false)
    MESWITCH_GEMV_ALL_GROUPS(meswitch_delta_gemv_b, 4, false))
