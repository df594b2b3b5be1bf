// Host emulation of ptx/kernels/activation.cu (see simt.h).
#include <cuda_fp16.h>

#include "activation.cu"
#include "plain_module.h"

MESWITCH_EMU_MODULE(activation, MESWITCH_EMU_ENTRY(meswitch_swiglu), MESWITCH_EMU_ENTRY(meswitch_add_residual), MESWITCH_EMU_ENTRY(meswitch_embed))
