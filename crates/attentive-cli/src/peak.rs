//! `attentive peak`: this machine's ceilings, measured now: the f32 fused multiply-add rate and
//! the memory read bandwidth, the two numbers a benchmark divides by (kernel GFLOP/s over the
//! FMA ceiling; a decode's bytes per second over the read bandwidth).
//!
//! - FMA: each thread runs 16 independent chains `a ← a·x + y` of the widest vector the CPU has
//!   (AVX-512, else AVX2 with FMA, else scalar `mul_add`); 16 chains cover the 4-cycle latency
//!   of two FMA ports.
//! - Read: each thread sums its share of a 1 GiB buffer (on huge pages, as the kernel's large
//!   inputs are meant to be: `attentive::HugeVec`) with four vector accumulators.
//!
//! Each figure is the median of five runs.

use crate::error::CliError;
use attentive::HugeVec;
use std::time::Instant;

#[derive(clap::Args)]
pub struct PeakArgs {
    /// Threads to measure with (2 is the thread count of the benchmarks).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Measure the read bandwidth on this many MiB instead of 1024 (a quick check).
    #[arg(long, default_value_t = 1024)]
    read_mib: usize,
}

/// Chain steps per FMA run: about 0.1 s per run on a 3 GHz core.
const TRIPS: u64 = 20_000_000;

pub fn peak(a: PeakArgs) -> Result<(), CliError> {
    let threads = a.threads.max(1);
    let n = a.read_mib.max(1) << 18; // floats
    let mut buf = HugeVec::<f32>::zeroed(n)?;
    for (i, x) in buf.iter_mut().enumerate() {
        *x = (i & 1023) as f32;
    }
    let (isa, lanes) = widest();
    let (mut fma, mut read) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(fma_chains(TRIPS)));
            }
        });
        fma.push(
            threads as f64 * TRIPS as f64 * 16.0 * lanes as f64 * 2.0
                / t.elapsed().as_secs_f64()
                / 1e9,
        );
        let per = n / threads / 64 * 64;
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(per).take(threads) {
                s.spawn(move || std::hint::black_box(sum(part)));
            }
        });
        read.push((per * threads * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    out!(
        "{}",
        serde_json::json!({
            "threads": threads,
            "fma_gflops": (median(&mut fma) * 10.0).round() / 10.0,
            "read_gbps": (median(&mut read) * 10.0).round() / 10.0,
            "isa": isa,
        })
    );
    Ok(())
}

/// The widest FMA this CPU runs and its f32 lanes.
fn widest() -> (&'static str, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return ("avx512", 16);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return ("avx2", 8);
        }
    }
    ("scalar", 1)
}

/// Runs `trips` steps of 16 FMA chains on the widest vectors; returns a value that depends on
/// every chain, so none is optimised away.
fn fma_chains(trips: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        match widest().0 {
            // SAFETY: the feature was detected on this CPU just above.
            "avx512" => return unsafe { x86::fma_avx512(trips) },
            // SAFETY: as above.
            "avx2" => return unsafe { x86::fma_avx2(trips) },
            _ => {}
        }
    }
    let (x, y) = (
        std::hint::black_box(0.999_999_9f32),
        std::hint::black_box(1e-7f32),
    );
    let mut a: [f32; 16] = std::array::from_fn(|i| i as f32);
    for _ in 0..trips {
        for v in &mut a {
            *v = v.mul_add(x, y);
        }
    }
    a.iter().sum()
}

/// The sum of `x`, read once in order.
fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if widest().0 == "avx512" {
        // SAFETY: AVX-512 was detected on this CPU.
        return unsafe { x86::sum_avx512(x) };
    }
    let mut acc = [0.0f32; 16];
    for c in x.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(trips: u64) -> f32 {
        let (x, y) = (
            _mm512_set1_ps(std::hint::black_box(0.999_999_9)),
            _mm512_set1_ps(std::hint::black_box(1e-7)),
        );
        let mut a: [__m512; 16] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
        for _ in 0..trips {
            for v in &mut a {
                *v = _mm512_fmadd_ps(*v, x, y);
            }
        }
        _mm512_reduce_add_ps(
            a.iter()
                .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(trips: u64) -> f32 {
        let (x, y) = (
            _mm256_set1_ps(std::hint::black_box(0.999_999_9)),
            _mm256_set1_ps(std::hint::black_box(1e-7)),
        );
        let mut a: [__m256; 16] = std::array::from_fn(|i| _mm256_set1_ps(i as f32));
        for _ in 0..trips {
            for v in &mut a {
                *v = _mm256_fmadd_ps(*v, x, y);
            }
        }
        let mut lanes = [0.0f32; 8];
        let s = a
            .iter()
            .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512(x: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        for c in x.chunks_exact(64) {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: c holds 64 floats, so 16 from 16·j are in bounds.
                *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * j)) });
            }
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)),
        )
    }
}
