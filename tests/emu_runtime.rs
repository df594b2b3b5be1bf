//! The host emulation's own runtime (`ptx/emu/simt.cpp`), on the kernels of
//! `ptx/emu/module_selftest.cpp`: its mma follows the PTX ISA's fragment
//! layout (built here independently, matrix first, then packed into
//! fragments), shuffles and barriers compute what they should, and the
//! faults a GPU would hang on or report as an error are launch errors.

use half::f16;
use meswitch_ptx::abi;
use meswitch_ptx::emu::{self, EmuError, Region};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The FP16 conversions every emulated kernel uses are IEEE's: widening is
/// exact for all 65536 patterns; rounding is to nearest even, checked
/// against `half`'s f32 → f16 (single rounding) on random f32 values of
/// every magnitude, and from first principles just off every tie: a double
/// one part in 2³² above (below) the midpoint of two neighbouring halves
/// must round to the upper (lower) one, where rounding through f32 first
/// would land on the tie and go to the even one. (`half`'s f64 → f16 is not
/// used: with F16C it rounds through f32.)
#[test]
fn fp16_conversions_are_ieee() {
    for h in 0..=u16::MAX {
        let (got, want) = (emu::half_bits_to_f32(h), f16::from_bits(h).to_f32());
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#06x}: {got} vs {want}"
        );
    }
    let mut rng = StdRng::seed_from_u64(9);
    let check = |v: f32| {
        let (got, want) = (
            emu::half_bits_from_f64(f64::from(v)),
            f16::from_f32(v).to_bits(),
        );
        assert_eq!(got, want, "{v:e}: {got:#06x} vs {want:#06x}");
    };
    for _ in 0..200_000 {
        let v = rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-30..18));
        check(v);
    }
    const OFF_TIE: f64 = 1.0 / 4_294_967_296.0;
    for h in 0..0x7BFFu16 {
        let (a, b) = (f16::from_bits(h).to_f64(), f16::from_bits(h + 1).to_f64());
        let mid = (a + b) / 2.0; // exact: 12 significant bits
        check(mid as f32); // the tie itself: to the even one
        let step = (b - a) * OFF_TIE;
        assert_eq!(
            emu::half_bits_from_f64(mid + step),
            h + 1,
            "just above {mid:e}"
        );
        assert_eq!(emu::half_bits_from_f64(mid - step), h, "just below {mid:e}");
        assert_eq!(emu::half_bits_from_f64(-(mid + step)), 0x8000 | (h + 1));
    }
    for v in [
        0.0f32,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        f32::MAX,
        f32::INFINITY,
        1e-8,
        3e-8,
        1e-45,
    ] {
        check(v);
        check(-v);
    }
    assert_eq!(emu::half_bits_from_f64(1e300), 0x7C00);
    assert_eq!(emu::half_bits_from_f64(f64::NAN) & 0x7E00, 0x7E00);
}

const M: usize = 16;
const N: usize = 8;
const K: usize = 16;
const LANES: usize = 32;

fn params(a: u64, out: u64, n: u32) -> abi::MeswitchElementwiseParams {
    abi::MeswitchElementwiseParams {
        a,
        b: 0,
        out,
        n,
        reserved: 0,
    }
}

fn pack(lo: f16, hi: f16) -> u32 {
    u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16)
}

/// mma.m16n8k16 on small integers (exact in f16 and f32): D = A·B + C.
#[test]
fn mma_follows_the_ptx_fragment_layout() {
    let mut rng = StdRng::seed_from_u64(3);
    let small = |rng: &mut StdRng| f16::from_f32(rng.random_range(-8i32..=8) as f32);
    let a: Vec<Vec<f16>> = (0..M)
        .map(|_| (0..K).map(|_| small(&mut rng)).collect())
        .collect();
    let b: Vec<Vec<f16>> = (0..K)
        .map(|_| (0..N).map(|_| small(&mut rng)).collect())
        .collect();
    let c: Vec<Vec<f32>> = (0..M)
        .map(|_| {
            (0..N)
                .map(|_| rng.random_range(-100i32..=100) as f32)
                .collect()
        })
        .collect();
    // Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16", f16 A/B, f32 C).
    let mut regs = vec![0u32; 6 * LANES];
    let mut acc = vec![0f32; 4 * LANES];
    for lane in 0..LANES {
        let (g, t) = (lane / 4, lane % 4);
        let r = &mut regs[6 * lane..][..6];
        r[0] = pack(a[g][2 * t], a[g][2 * t + 1]);
        r[1] = pack(a[g + 8][2 * t], a[g + 8][2 * t + 1]);
        r[2] = pack(a[g][2 * t + 8], a[g][2 * t + 9]);
        r[3] = pack(a[g + 8][2 * t + 8], a[g + 8][2 * t + 9]);
        r[4] = pack(b[2 * t][g], b[2 * t + 1][g]);
        r[5] = pack(b[2 * t + 8][g], b[2 * t + 9][g]);
        acc[4 * lane..][..4].copy_from_slice(&[
            c[g][2 * t],
            c[g][2 * t + 1],
            c[g + 8][2 * t],
            c[g + 8][2 * t + 1],
        ]);
    }
    let p = params(emu::addr(&regs), emu::addr_mut(&mut acc), 0);
    // SAFETY: 6 words of inputs and 4 accumulators per lane of one warp.
    unsafe { emu::launch("meswitch_emu_selftest_mma", (1, 1, 1), (32, 1, 1), &p, &[]) }.unwrap();
    for lane in 0..LANES {
        let (g, t) = (lane / 4, lane % 4);
        for (k, (row, col)) in [
            (g, 2 * t),
            (g, 2 * t + 1),
            (g + 8, 2 * t),
            (g + 8, 2 * t + 1),
        ]
        .into_iter()
        .enumerate()
        {
            let want: f32 = c[row][col]
                + (0..K)
                    .map(|i| a[row][i].to_f32() * b[i][col].to_f32())
                    .sum::<f32>();
            assert_eq!(acc[4 * lane + k], want, "D[{row}][{col}] (lane {lane})");
        }
    }
}

#[test]
fn shuffles_and_barriers_reduce_a_block() {
    const BLOCKS: usize = 3;
    const THREADS: usize = 256;
    let a: Vec<f32> = (0..BLOCKS * THREADS).map(|i| (i % 97) as f32).collect();
    let mut out = vec![f32::NAN; BLOCKS];
    let p = params(emu::addr(&a), emu::addr_mut(&mut out), 0);
    // SAFETY: one input per thread, one output per block.
    unsafe {
        emu::launch(
            "meswitch_emu_selftest_block_sum",
            (BLOCKS as u32, 1, 1),
            (THREADS as u32, 1, 1),
            &p,
            &[],
        )
    }
    .unwrap();
    for (blk, got) in out.iter().enumerate() {
        let want: f32 = a[blk * THREADS..][..THREADS].iter().sum();
        assert_eq!(*got, want, "block {blk}");
    }
}

fn kernel_error(
    entry: &str,
    block: u32,
    p: &abi::MeswitchElementwiseParams,
    regions: &[Region],
) -> String {
    // SAFETY: the callers give each selftest kernel the buffers it reads
    // (block_sum: one float per thread at p.a; load: 16 bytes at p.a + p.n)
    // and writes (one word at p.out); the others touch no memory.
    match unsafe { emu::launch(entry, (1, 1, 1), (block, 1, 1), p, regions) } {
        Err(EmuError::Kernel(m)) => m,
        other => panic!("{entry}: expected a kernel error, got {other:?}"),
    }
}

#[test]
fn faults_are_errors_not_hangs() {
    let p = params(0, 0, 0);
    let m = kernel_error("meswitch_emu_selftest_split_warp", 64, &p, &[]);
    assert!(m.contains("deadlock"), "{m}");
    let m = kernel_error("meswitch_emu_selftest_shuffle_without_lane", 32, &p, &[]);
    assert!(m.contains("returned"), "{m}");
    let (a, mut out) = ([1f32; 48], [0f32; 1]);
    let sum = params(emu::addr(&a), emu::addr_mut(&mut out), 0);
    let m = kernel_error("meswitch_emu_selftest_block_sum", 48, &sum, &[]);
    assert!(m.contains("partial warp"), "{m}");
}

#[test]
fn checked_loads_need_alignment_and_a_declared_buffer() {
    // 32 bytes, 16-byte aligned (u128 alignment on x86-64 Linux is 16).
    let words = [0x1111_2222_3333_4444u128, 0x5555_6666_7777_8888u128];
    let bytes = Region::of(&words);
    let mut out = [0u32; 1];
    let at = |n: u32, out: &mut [u32]| params(emu::addr(&words), emu::addr_mut(out), n);

    let p = at(16, &mut out);
    // SAFETY: reads bytes 16..32 of `words`, writes out[0].
    unsafe {
        emu::launch(
            "meswitch_emu_selftest_load",
            (1, 1, 1),
            (1, 1, 1),
            &p,
            &[bytes],
        )
    }
    .unwrap();
    assert_eq!(out[0], 0x7777_8888);

    let m = kernel_error("meswitch_emu_selftest_load", 1, &at(4, &mut out), &[bytes]);
    assert!(m.contains("misaligned"), "{m}");
    let m = kernel_error("meswitch_emu_selftest_load", 1, &at(16, &mut out), &[]);
    assert!(m.contains("outside every buffer"), "{m}");
    let m = kernel_error("meswitch_emu_selftest_load", 1, &at(32, &mut out), &[bytes]);
    assert!(m.contains("outside every buffer"), "{m}");
}

/// Every entry point the GPU modules define (their PTX's `.entry` lines)
/// can run in the emulation: no module or variant is missing from it.
#[test]
fn every_ptx_entry_point_is_emulated() {
    let mut n = 0;
    for m in meswitch_ptx::MODULES {
        for line in m.ptx.lines() {
            if let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") {
                let name = rest.split('(').next().expect("entry name");
                assert!(emu::has_entry(name), "{}: {name} is not emulated", m.name);
                n += 1;
            }
        }
    }
    // 4 GEMV modules x 3 bits x 4 groups x 4 tile counts, 3 dequantize, 7 layer kernels.
    assert_eq!(n, 4 * 3 * 4 * 4 + 3 + 7, "entry points found in the PTX");
    assert!(!emu::has_entry("meswitch_no_such_kernel"));
}

#[test]
fn bad_launches_are_refused() {
    let p = params(0, 0, 0);
    // SAFETY: refused before any kernel runs.
    let refused =
        |entry: &str, block: u32| unsafe { emu::launch(entry, (1, 1, 1), (block, 1, 1), &p, &[]) };
    assert!(matches!(
        refused("no_such_kernel", 32),
        Err(EmuError::Launch(_))
    ));
    assert!(matches!(
        refused("meswitch_emu_selftest_load", 0),
        Err(EmuError::Launch(_))
    ));
    assert!(matches!(
        refused("meswitch_emu_selftest_load", 2048),
        Err(EmuError::Launch(_))
    ));
    // The wrong param struct for an entry is refused by its size.
    let gemv = abi::MeswitchGemvParams {
        base: 0,
        experts: 0,
        row_expert: 0,
        x: 0,
        y: 0,
        out_features: 0,
        in_features: 0,
        batch: 0,
        n_experts: 0,
    };
    // SAFETY: refused before any kernel runs.
    let wrong = unsafe {
        emu::launch(
            "meswitch_emu_selftest_load",
            (1, 1, 1),
            (1, 1, 1),
            &gemv,
            &[],
        )
    };
    assert!(matches!(wrong, Err(EmuError::Launch(m)) if m.contains("size")));
}
