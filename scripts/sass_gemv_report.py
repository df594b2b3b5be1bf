#!/usr/bin/env python3
"""Static SASS figures of the GEMV delta loop: the 128-column kernel against
the wide one, per 128 input columns of one expert. Static, from SASS; not a
timing: it counts instructions in the code, not instructions executed.

usage: sass_gemv_report.py <nvdisasm> <classic.cubin> <wide.cubin>
           [--before <classic.cubin> <wide.cubin>] [--mix <suffix>]... <entry suffix>...

An entry suffix is e.g. `b2_g128_t1`; the entries compared are
meswitch_multi_expert_gemv_<suffix> and meswitch_multi_expert_gemv_wide_<suffix>.
With --before (cubins of an earlier build: ptxas on the PTX of an earlier
commit, `git show <rev>:ptx/ptx/multi_expert_gemv.ptx`), the table gets a
column with that build's figure. --mix <suffix> prints, after the table,
the opcode mix per 128 columns x expert of both kernels' delta loop for that
entry (before and after when --before is given).

The delta loop is found from the SASS alone: the loop (a backward branch and
the instructions between its target and itself) with the most HFMA2 (the
dequantization; the base and salient loops have none), taken at its
outermost extent. Inner loops that contain HMMA (the wide kernel's rolled
or partly unrolled 32-column sub-blocks) are weighted by their trip count:
one item's 4/bits sub-blocks hold 8·TILES HMMA each, so the trip count is
(4/bits)·8·TILES / (HMMA in the inner loop); other inner loops (the
item-index carry) count once.

Normalisation: a 128-column block of one expert against one n-tile of 8
batch rows is 8 mma.m16n8k16 (HMMA.16816), whatever the kernel, so the
figures are "per 8·TILES HMMA" = per 128 columns of one expert with every
n-tile holding a row of it (both kernels' worst case per item).
"""
import re
import subprocess
import sys
from collections import Counter

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
LABEL = re.compile(r"^(\.L_x_\d+):")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")
MMA_PER_128_COLUMNS_PER_TILE = 128 // 16


def function_sass(nvdisasm, cubin, name):
    text = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith(".text."):
            inside = line.startswith(f".text.{name}:")
            continue
        if inside:
            lines.append(line)
    if not lines:
        sys.exit(f"{name}: not in {cubin}")
    return lines


def parse(lines):
    """-> (instructions [(addr, opcode, line)], labels {name: addr})"""
    insns, labels, pending = [], {}, []
    for line in lines:
        if m := LABEL.match(line.strip()):
            pending.append(m.group(1))
            continue
        if m := INSN.search(line):
            addr = int(m.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            insns.append((addr, m.group(3), line))
    return insns, labels


def loops(insns, labels):
    """Back edges as (head address, branch address)."""
    out = []
    for addr, op, line in insns:
        if op.startswith("BRA") and (m := TARGET.search(line)):
            head = labels.get(m.group(1))
            if head is not None and head <= addr:
                out.append((head, addr))
    return out


def in_range(insns, lo, hi):
    return [i for i in insns if lo <= i[0] <= hi]


def delta_loop_figures(insns, labels, item_mma):
    """item_mma: HMMA of one item's sub-blocks (inner loops' trip counts)."""
    all_loops = loops(insns, labels)
    ops = lambda lo, hi: Counter(op.split(".")[0] for _, op, _ in in_range(insns, lo, hi))
    best = max(all_loops, key=lambda l: (ops(*l)["HFMA2"], l[1] - l[0]))
    lo, hi = best
    # Outermost loop with the same dequantization work.
    for l in all_loops:
        if l[0] <= lo and l[1] >= hi and ops(*l)["HFMA2"] == ops(*best)["HFMA2"]:
            lo, hi = min(lo, l[0]), max(hi, l[1])
    weight = {}
    for a, b in all_loops:
        if lo <= a and b <= hi and (a, b) != (lo, hi) and ops(a, b)["HMMA"] > 0:
            for addr, _, _ in in_range(insns, a, b):
                weight[addr] = item_mma // ops(a, b)["HMMA"]
    total, count = 0, Counter()
    for addr, op, _ in in_range(insns, lo, hi):
        w = weight.get(addr, 1)
        total += w
        count[op.split(".")[0]] += w
    return total, count


def figures(nvdisasm, cubin, name, bits, tiles, subs):
    """-> (total, opcode counter, blocks of 128 columns x expert in the loop)"""
    insns, labels = parse(function_sass(nvdisasm, cubin, name))
    item_mma = subs * MMA_PER_128_COLUMNS_PER_TILE * tiles
    total, count = delta_loop_figures(insns, labels, item_mma)
    return total, count, count["HMMA"] / (MMA_PER_128_COLUMNS_PER_TILE * tiles)


def kernels(sfx, classic, wide):
    bits = int(re.search(r"b(\d)", sfx).group(1))
    return [
        ("128-column", classic, f"meswitch_multi_expert_gemv_{sfx}", 1),
        ("wide", wide, f"meswitch_multi_expert_gemv_wide_{sfx}", 4 // bits),
    ]


def mix_line(count, blocks):
    return " ".join(f"{op} {n / blocks:g}" for op, n in count.most_common())


def main():
    args = sys.argv[1:]
    nvdisasm, classic, wide = args[:3]
    rest, before, mixes, suffixes = args[3:], None, [], []
    while rest:
        a = rest.pop(0)
        if a == "--before":
            before = (rest.pop(0), rest.pop(0))
        elif a == "--mix":
            mixes.append(rest.pop(0))
        else:
            suffixes.append(a)
    was = " before |" if before else ""
    print(f"| entry (sm_90) | kernel | loop insts | HMMA |{was} per 128 cols x expert: all | LDG+LD | LDS | LOP3 | HFMA2+HADD2 | other |")
    print("|---|---|---|---|" + ("---|" if before else "") + "---|---|---|---|---|---|")
    for sfx in suffixes:
        bits = int(re.search(r"b(\d)", sfx).group(1))
        tiles = int(re.search(r"_t(\d)", sfx).group(1))
        old = kernels(sfx, *before) if before else [None, None]
        for (kernel, cubin, name, subs), prev in zip(kernels(sfx, classic, wide), old):
            total, count, blocks = figures(nvdisasm, cubin, name, bits, tiles, subs)
            per = lambda n: n / blocks
            # Generic LD: loads through a pointer read from shared memory
            # (the 128-column kernel's scales), global in fact.
            ldg, lds = count["LDG"] + count["LD"], count["LDS"]
            lop, hf = count["LOP3"], count["HFMA2"] + count["HADD2"]
            other = total - ldg - lds - lop - hf - count["HMMA"]
            cell = ""
            if prev:
                t0, _, b0 = figures(nvdisasm, prev[1], prev[2], bits, tiles, prev[3])
                cell = f" {t0 / b0:.0f} |"
            print(f"| `{sfx}` | {kernel} | {total} | {count['HMMA']} |{cell} {per(total):.0f} | "
                  f"{per(ldg):.1f} | {per(lds):.1f} | {per(lop):.0f} | {per(hf):.0f} | {per(other):.0f} |")
    for sfx in mixes:
        bits = int(re.search(r"b(\d)", sfx).group(1))
        tiles = int(re.search(r"_t(\d)", sfx).group(1))
        print(f"\nOpcode mix of the delta loop per 128 columns x expert, `{sfx}` (sm_90, static):\n")
        builds = ([("before", before)] if before else []) + [("after" if before else "now", (classic, wide))]
        for label, cubins in builds:
            for kernel, cubin, name, subs in kernels(sfx, *cubins):
                total, count, blocks = figures(nvdisasm, cubin, name, bits, tiles, subs)
                print(f"- {kernel}, {label} ({total / blocks:.0f}): {mix_line(count, blocks)}")


if __name__ == "__main__":
    main()
