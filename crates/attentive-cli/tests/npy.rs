//! The `.npy` reader on hostile headers: every malformed file is an error that names what is
//! wrong, before anything is allocated for what the header claims.

use attentive_cli::npy::{parse, write_f32, Parsed};

/// A `.npy` file (format 1.0) with the given header dict text and data bytes.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn f32_dict(shape: &str) -> String {
    format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}")
}

fn err(bytes: &[u8], want: u8) -> String {
    match parse(bytes, want) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_written_file_reads_back() {
    let dir = std::env::temp_dir().join(format!("attentive-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.npy");
    let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    write_f32(&path, &[2, 3, 4], &data).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let Parsed::F32(a) = parse(&bytes, 0).unwrap() else {
        panic!("kind")
    };
    assert_eq!((a.shape, a.data), (vec![2, 3, 4], data));
    // The same bytes from a hand-made header, and a zero-length array.
    let raw: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let Parsed::F32(a) = parse(&npy(&f32_dict("(2,)"), &raw), 0).unwrap() else {
        panic!("kind")
    };
    assert_eq!(a.data, vec![1.5, -2.0]);
    let Parsed::F32(a) = parse(&npy(&f32_dict("(0, 7)"), &[]), 0).unwrap() else {
        panic!("kind")
    };
    assert_eq!((a.shape, a.data.len()), (vec![0, 7], 0));
}

#[test]
fn hostile_headers_are_errors() {
    let four = [0u8; 4];
    for (bytes, want) in [
        // More elements than bytes, by far and by one.
        (
            npy(&f32_dict("(4294967296, 4294967296)"), &four),
            "more than 2^64",
        ),
        (
            npy(&f32_dict("(1048576, 1048576)"), &four),
            "file holds 4 bytes",
        ),
        (npy(&f32_dict("(2,)"), &four), "expected float32"),
        // A zero extent beside extents whose product overflows.
        (
            npy(&f32_dict("(0, 4294967296, 4294967296)"), &[]),
            "more than 2^64",
        ),
        (
            npy(&f32_dict("(99999999999999999999999,)"), &four),
            "no readable shape",
        ),
        (npy(&f32_dict("(-1,)"), &four), "no readable shape"),
        (
            npy("{'descr': '<f4', 'fortran_order': False}", &four),
            "no readable shape",
        ),
        (
            npy(&f32_dict("(1,)").replace("False", "True"), &four),
            "Fortran",
        ),
        (
            npy(&f32_dict("(1,)").replace("<f4", "<i8"), &four),
            "float32",
        ),
        (b"\x93NUMPY\x01\x00\xff".to_vec(), "not a .npy file"),
        (
            b"PK\x03\x04 not numpy at all".to_vec(),
            "no \\x93NUMPY magic",
        ),
        (b"\x93NUMPY\x09\x00\x10\x00".to_vec(), "version 9"),
        (
            b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec(),
            "at most 65536",
        ),
        (
            b"\x93NUMPY\x01\x00\x40\x00{'descr'".to_vec(),
            "shorter than its header",
        ),
        (Vec::new(), "no \\x93NUMPY magic"),
        // Nested brackets: the header parser's time grows exponentially with their depth.
        (
            npy(
                &f32_dict("(2,)").replace(
                    "'<f4'",
                    &format!("{}'<f4'{}", "[".repeat(40), "]".repeat(40)),
                ),
                &four,
            ),
            "plain dtypes",
        ),
        (
            npy(
                &f32_dict("(2,)")
                    .replace("False", &format!("{}1{}", "(".repeat(40), ")".repeat(40))),
                &four,
            ),
            "plain dtypes",
        ),
        (
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../fuzz/corpus/npy/regression-nested-descr"
            ))
            .unwrap()[1..]
                .to_vec(),
            "plain dtypes",
        ),
    ] {
        let e = err(&bytes, 0);
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    // Ids: the integer kinds only, each in 0..2^32.
    let ids = |descr: &str, data: &[u8]| {
        npy(
            &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (1,), }}"),
            data,
        )
    };
    assert!(err(&ids("<f4", &four), 2).contains("int32, int64"));
    assert!(err(&ids("<i8", &(-1i64).to_le_bytes()), 2).contains("id -1"));
    assert!(err(&ids("<u8", &(1u64 << 40).to_le_bytes()), 2).contains("not in 0..2^32"));
    let Parsed::Ids(a) = parse(&ids("<i4", &7i32.to_le_bytes()), 2).unwrap() else {
        panic!("kind")
    };
    assert_eq!(a.data, vec![7]);
}
