// Host emulation of ptx/kernels/norm.cu (see simt.h).
#include <cuda_fp16.h>

#include "norm.cu"
#include "plain_module.h"

MESWITCH_EMU_MODULE(norm, MESWITCH_EMU_ENTRY(meswitch_rms_norm))
