//! The `--pattern` text parser, and every pattern it accepts tabulated as a block mask for an
//! arbitrary problem size: an error or a table that agrees with the pattern's own rule.
#![no_main]

use attentive::{BlockMask, Pattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, u32, u32, u8, u8)| {
    let (text, nq, nk, b, h) = input;
    let Ok(pattern) = text.parse::<Pattern>() else {
        return;
    };
    // The rule itself at sizes up to 2^62, where offsets no longer fit 32 bits: no overflow.
    let big = |x: u32| (x as usize) << (x % 31);
    let (bq, bk) = (big(nq).max(1), big(nk).max(1));
    for (i, j) in [
        (0, 0),
        (bq - 1, bk - 1),
        (bq / 2, bk / 3),
        (bq - 1, 0),
        (0, bk - 1),
    ] {
        let _ = pattern.visible_at(bq, bk, attentive::Pos { b: 1, h: 2, i, j });
    }
    // Sizes up to 2^14 a side: building visits every pair of tiles and tabulates each partial
    // one row by row; in the instrumented build a strided mask took over 20 s at 2^16. A table too large for the
    // memory available must be an error (run.sh caps it with ATTENTIVE_MAX_MEMORY below
    // libFuzzer's limit; tests/limits.rs refuses one of 64 GiB at 2^20).
    let (b, h) = (b as usize % 3, h as usize % 3);
    let (nq, nk) = (nq as usize % (1 << 14), nk as usize % (1 << 14));
    let Ok(mask) = BlockMask::new(&pattern, b, h, nq, nk) else {
        return;
    };
    // Agreement with the rule, on a sample of pairs.
    let (sq, sk) = (nq.min(40), nk.min(40));
    for bi in 0..b {
        for hi in 0..h {
            for i in (0..sq).chain(nq - sq.min(nq)..nq) {
                for j in (0..sk).chain(nk - sk.min(nk)..nk) {
                    let want = pattern.visible_at(nq, nk, attentive::Pos { b: bi, h: hi, i, j });
                    assert_eq!(mask.visible(bi, hi, i, j), want, "({bi},{hi},{i},{j})");
                }
            }
        }
    }
});
