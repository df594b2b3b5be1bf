// plain_module.h: the entry table of a module whose entry points are plain
// functions (no variants): MESWITCH_EMU_MODULE(name, entry, entry, ...).
#ifndef MESWITCH_EMU_PLAIN_MODULE_H
#define MESWITCH_EMU_PLAIN_MODULE_H

#define MESWITCH_EMU_ENTRY(kernel) meswitch_emu::entry_of(#kernel, kernel)

#define MESWITCH_EMU_MODULE(name, ...)                                                               \
    meswitch_emu::Module meswitch_emu_module_##name() {                                              \
        static const meswitch_emu::Entry entries[] = {__VA_ARGS__};                                  \
        return meswitch_emu::Module{entries, sizeof entries / sizeof entries[0], meswitch_emu::StaticData{nullptr, 0}}; \
    }

#endif  // MESWITCH_EMU_PLAIN_MODULE_H
