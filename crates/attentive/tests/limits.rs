//! Requests larger than the machine: refused with an error that gives the size, before any of
//! it is allocated (a process that tried would be killed by the system, or abort).

use attentive::{probabilities, AttnError, Options, View};

#[test]
fn probabilities_of_a_million_positions_are_refused_before_allocating() {
    let n = 1_000_000;
    let x = vec![0.5f32; n];
    let q = View::contiguous(&x, &[1, 1, n, 1]).unwrap();
    let before = std::time::Instant::now();
    let e = probabilities(q, q, &Options::new()).unwrap_err();
    // Refused at once: nothing was computed or written first.
    assert!(before.elapsed().as_secs_f64() < 1.0);
    match &e {
        AttnError::OutOfMemory {
            what,
            bytes,
            available,
        } => {
            assert_eq!(
                (*what, *bytes),
                ("probabilities", 4 * n as u128 * n as u128)
            );
            assert!(available.is_some_and(|a| (a as u128) < *bytes));
        }
        e => panic!("{e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("4000000000000 bytes (3.6 TiB) would exceed"),
        "{msg}"
    );
}

#[test]
fn probabilities_within_memory_still_run() {
    let x = vec![0.5f32; 8];
    let q = View::contiguous(&x, &[1, 1, 8, 1]).unwrap();
    let p = probabilities(q, q, &Options::new()).unwrap();
    assert_eq!(p.len(), 64);
    assert!(p.iter().all(|&w| (w - 0.125).abs() < 1e-6));
}

#[test]
fn a_block_mask_larger_than_memory_is_refused_before_it_is_built() {
    // A stride leaves a partial tile nearly everywhere below the diagonal: at a million
    // positions its bits alone take about 64 GiB; a causal mask of the same size, a few MiB.
    let strided: attentive::Pattern = "strided:3".parse().unwrap();
    let n = 1 << 20;
    let t = std::time::Instant::now();
    match attentive::BlockMask::new(&strided, 1, 1, n, n) {
        Err(AttnError::OutOfMemory { what, bytes, .. }) => {
            assert_eq!(what, "block mask");
            assert!(bytes > 60 << 30, "{bytes}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a table of more than 60 GiB was built"),
    }
    assert!(t.elapsed().as_secs_f64() < 30.0);
    let causal: attentive::Pattern = "causal".parse().unwrap();
    assert!(attentive::BlockMask::new(&causal, 1, 1, n, n).is_ok());
}

#[test]
fn shapes_whose_element_count_passes_the_address_space_are_refused() {
    let big = 1usize << 33;
    let x = [0.5f32; 4];
    // A row-major shape of 2⁶⁶ elements: no slice holds it (the count is not wrapped to 0).
    assert!(matches!(
        View::contiguous(&x, &[big, big, 1, 1]),
        Err(AttnError::OutOfBounds { .. })
    ));
    assert!(View::from_bnhd(&x, [big, big, big, 1]).is_err());
    let mut out = [0.0f32; 4];
    assert!(attentive::ViewMut::contiguous(&mut out, [big, big, 4, 1]).is_err());
    // Empty shapes are empty whatever their other sides.
    assert!(attentive::ViewMut::contiguous(&mut [], [big, big, 0, 1]).is_ok());
    // A broadcast view of 2⁶⁰ elements over one value is valid; a method that would copy it
    // refuses with the size instead of overflowing or aborting.
    let wide = View::new(&x[..1], [1 << 20, 1 << 20, 1 << 20, 1], [0, 0, 0, 0]).unwrap();
    match wide.try_to_vec() {
        Err(AttnError::OutOfMemory { bytes, .. }) => assert_eq!(bytes, 4 << 60),
        r => panic!("{r:?}"),
    }
    // Linear attention copies its inputs per head: a query and key of 2⁴⁰ features over one
    // value are refused, not attempted.
    use attentive::variants::linear::{forward, Linear};
    let qk = View::new(&x[..1], [1, 1, 4, 1 << 40], [0, 0, 0, 0]).unwrap();
    let v = View::new(&x[..1], [1, 1, 4, 1], [0, 0, 0, 0]).unwrap();
    let mut o = [0.0f32; 4];
    let mut ov = attentive::ViewMut::contiguous(&mut o, [1, 1, 4, 1]).unwrap();
    match forward(qk, qk, v, &Linear::default(), &mut ov) {
        Err(AttnError::OutOfMemory { .. }) => {}
        r => panic!("{r:?}"),
    }
}
