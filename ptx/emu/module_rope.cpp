// Host emulation of ptx/kernels/rope.cu (see simt.h).
#include <cuda_fp16.h>

#include "rope.cu"
#include "plain_module.h"

MESWITCH_EMU_MODULE(rope, MESWITCH_EMU_ENTRY(meswitch_rope))
