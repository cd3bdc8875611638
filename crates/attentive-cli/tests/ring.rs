//! `attend --ring-threads P` and, in a build with the `mpi` feature, `mpiexec -n P attentive
//! attend --ring` end to end: the same .npy files in and out as `attend`, within the accuracy
//! rule of the f64 oracle, one rank bit for bit `attend`, MPI bit for bit the threaded ring, and
//! faults (ranks started on different files, a rank killed, a rank stopped) ending every process
//! with an error and a non-zero exit rather than a wait.

use attentive::{reference, Causal, Options, View};
mod common;
#[path = "../../attentive/tests/common/mod.rs"]
mod engine;
use common::write_npy;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_attentive");

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-ring-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A problem written as .npy files into its folder.
struct Problem {
    dir: PathBuf,
    q: [usize; 4],
    k: [usize; 4],
    causal: bool,
}

impl Problem {
    fn new(
        name: &str,
        (b, hq, hkv, nq, nk, d): (usize, usize, usize, usize, usize, usize),
        causal: bool,
    ) -> Self {
        let p = Problem {
            dir: dir(name),
            q: [b, hq, nq, d],
            k: [b, hkv, nk, d],
            causal,
        };
        let mut rng = engine::Rng::new(nq as u64 * 31 + nk as u64);
        for (name, shape, scale) in [
            ("q", p.q, 2.0),
            ("k", p.k, 1.0),
            ("v", p.k, 1.0),
            ("g", p.q, 1.0),
        ] {
            let n = shape.iter().product();
            let x: Vec<f32> = rng.vec(n).iter().map(|x| scale * x).collect();
            write_npy(&p.path(name), &shape.map(|s| s as u64), &x);
        }
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.npy"))
    }

    /// `attend`'s arguments, the outputs named after `tag`.
    fn args(&self, tag: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            "attend",
            "--q",
            "q",
            "--k",
            "k",
            "--v",
            "v",
            "--grad-out",
            "g",
        ]
        .iter()
        .map(|s| match *s {
            "q" | "k" | "v" | "g" => self.path(s).display().to_string(),
            s => s.to_string(),
        })
        .collect();
        for (flag, out) in OUTPUTS {
            a.push(flag.into());
            a.push(self.path(&format!("{tag}-{out}")).display().to_string());
        }
        if self.causal {
            a.extend(["--causal".into(), "top-left".into()]);
        }
        a
    }

    fn outputs(&self, tag: &str) -> Vec<Vec<f32>> {
        OUTPUTS
            .iter()
            .map(|(_, o)| read(&self.path(&format!("{tag}-{o}"))))
            .collect()
    }
}

const OUTPUTS: [(&str, &str); 5] = [
    ("--out", "o"),
    ("--lse", "lse"),
    ("--dq", "dq"),
    ("--dk", "dk"),
    ("--dv", "dv"),
];

fn read(path: &Path) -> Vec<f32> {
    let f =
        npyz::NpyFile::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
    f.into_vec().unwrap()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn view(d: &[f32], s: [usize; 4]) -> View<'_> {
    View::contiguous(d, &s).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn shapes() -> Vec<(
    &'static str,
    (usize, usize, usize, usize, usize, usize),
    bool,
)> {
    vec![
        // GQA, a length no split divides evenly.
        ("causal", (2, 4, 2, 101, 101, 16), true),
        ("cross", (1, 3, 1, 57, 90, 8), false),
    ]
}

#[test]
fn threaded_ring_matches_the_oracle_and_one_rank_is_attend() {
    for (name, dims, causal) in shapes() {
        let p = Problem::new(&format!("threads-{name}"), dims, causal);
        run(Command::new(BIN).args(p.args("single")));
        let single = p.outputs("single");
        let (qd, kd, vd, gd) = (
            read(&p.path("q")),
            read(&p.path("k")),
            read(&p.path("v")),
            read(&p.path("g")),
        );
        let mut opts = Options::new();
        if causal {
            opts = opts.causal(Causal::TopLeft);
        }
        let (qv, kv, vv, gv) = (
            view(&qd, p.q),
            view(&kd, p.k),
            view(&vd, p.k),
            view(&gd, p.q),
        );
        let f64s = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
        let f32s = reference::forward::<f32>(qv, kv, vv, &opts).unwrap();
        let g64 = reference::backward::<f64>(qv, kv, vv, gv, &opts).unwrap();
        let g32 = reference::backward::<f32>(qv, kv, vv, gv, &opts).unwrap();
        for ranks in 1..=4 {
            let tag = format!("threads{ranks}");
            run(Command::new(BIN)
                .args(p.args(&tag))
                .args(["--ring-threads", &ranks.to_string()]));
            let got = p.outputs(&tag);
            if ranks == 1 {
                for (a, b) in got.iter().zip(&single) {
                    assert_eq!(bits(a), bits(b), "{name}: one rank differs from attend");
                }
            }
            let want = [
                (&f32s.o, &f64s.o, 2.0),
                (&f32s.lse, &f64s.lse, 2.0),
                (&g32.dq, &g64.dq, 3.0),
                (&g32.dk, &g64.dk, 3.0),
                (&g32.dv, &g64.dv, 3.0),
            ];
            for ((x, (n32, n64, factor)), (_, what)) in got.iter().zip(want).zip(OUTPUTS) {
                engine::check_rule(&format!("{name} P={ranks} {what}"), x, n32, n64, factor)
                    .unwrap();
            }
        }
        std::fs::remove_dir_all(&p.dir).unwrap();
    }
}

#[test]
fn a_failed_ring_leaves_no_output() {
    let p = Problem::new("fails", (1, 2, 2, 40, 40, 8), true);
    // Values of another width than the keys' rows hold: every rank refuses.
    write_npy(&p.path("v"), &[1, 2, 41, 8], &vec![0.5f32; 2 * 41 * 8]);
    let out = Command::new(BIN)
        .args(p.args("bad"))
        .args(["--ring-threads", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has shape"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&p.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter().all(|n| !n.to_string_lossy().contains("bad")),
        "{left:?}"
    );
    std::fs::remove_dir_all(&p.dir).unwrap();
}

#[cfg(not(feature = "mpi"))]
#[test]
fn ring_without_mpi_says_how_to_build_it() {
    let p = Problem::new("nompi", (1, 1, 1, 8, 8, 4), false);
    let out = Command::new(BIN)
        .args(p.args("x"))
        .arg("--ring")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features mpi"));
    std::fs::remove_dir_all(&p.dir).unwrap();
}
