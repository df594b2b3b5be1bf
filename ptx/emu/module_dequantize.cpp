// Host emulation of ptx/kernels/dequantize.cu (see simt.h).
#include <cuda_fp16.h>

#include "dequantize.cu"
#include "plain_module.h"

MESWITCH_EMU_MODULE(dequantize, MESWITCH_EMU_ENTRY(meswitch_dequantize_b1), MESWITCH_EMU_ENTRY(meswitch_dequantize_b2), MESWITCH_EMU_ENTRY(meswitch_dequantize_b4))
