// Host emulation of ptx/kernels/attention.cu (see simt.h).
#include <cuda_fp16.h>

#include "attention.cu"
#include "plain_module.h"

MESWITCH_EMU_MODULE(attention, MESWITCH_EMU_ENTRY(meswitch_kv_append), MESWITCH_EMU_ENTRY(meswitch_attention))
