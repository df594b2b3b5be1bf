// gemv_module.h: turns the GEMV entry-point macros of gemv_core.cuh into an
// entry table. A module file includes its .cu (which defines the entry
// points), then this header, then invokes the same MESWITCH_GEMV_*ALL_GROUPS
// lines as its .cu inside MESWITCH_EMU_GEMV_MODULE; every entry then appears
// in the table under the name the PTX gives it.
#ifndef MESWITCH_EMU_GEMV_MODULE_H
#define MESWITCH_EMU_GEMV_MODULE_H

#undef MESWITCH_GEMV_ENTRY
#define MESWITCH_GEMV_ENTRY(prefix, bits, gname, group, with_base, tiles, wide) \
    meswitch_emu::entry_of(#prefix #bits "_g" #gname "_t" #tiles, prefix##bits##_g##gname##_t##tiles),

// The module's statics: the all-zero x rows that masked mma operands read.
#define MESWITCH_EMU_GEMV_MODULE(name, ...)                                                        \
    meswitch_emu::Module meswitch_emu_module_##name() {                                            \
        static const meswitch_emu::Entry entries[] = {__VA_ARGS__};                                \
        return meswitch_emu::Module{entries, sizeof entries / sizeof entries[0],                   \
                                    meswitch_emu::StaticData{meswitch_zero_x, sizeof meswitch_zero_x}}; \
    }

#endif  // MESWITCH_EMU_GEMV_MODULE_H
