//! The `.npy` reader of the `attentive` command on arbitrary bytes, as float32, bool and ids:
//! an array or an error, never a panic, and never more memory than the bytes justify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&want, bytes)) = data.split_first() else {
        return;
    };
    if let Ok(parsed) = attentive_cli::npy::parse(bytes, want % 3) {
        let (shape, len) = match &parsed {
            attentive_cli::npy::Parsed::F32(a) => (&a.shape, a.data.len()),
            attentive_cli::npy::Parsed::Bool(a) => (&a.shape, a.data.len()),
            attentive_cli::npy::Parsed::Ids(a) => (&a.shape, a.data.len()),
        };
        assert_eq!(shape.iter().product::<usize>(), len);
        assert!(len <= bytes.len());
    }
});
