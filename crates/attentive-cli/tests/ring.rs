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
    fn new(name: &str, (b, hq, hkv, nq, nk, d): Dims, causal: bool) -> Self {
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

/// (B, Hq, Hkv, Nq, Nk, D).
type Dims = (usize, usize, usize, usize, usize, usize);

fn shapes() -> Vec<(&'static str, Dims, bool)> {
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

#[test]
fn ring_threads_out_of_range_is_a_clear_error() {
    let p = Problem::new("threads-range", (1, 1, 1, 8, 8, 4), false);
    for n in ["0", "1000000"] {
        let out = Command::new(BIN)
            .args(p.args("x"))
            .args(["--ring-threads", n])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("takes 1 to 1024 ranks, got {n}")),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&p.dir).unwrap();
}

#[test]
fn a_truncated_input_is_a_clear_error() {
    let p = Problem::new("truncated", (1, 2, 2, 40, 40, 8), false);
    let q = std::fs::read(p.path("q")).unwrap();
    std::fs::write(p.path("q"), &q[..q.len() - 4]).unwrap();
    let out = Command::new(BIN)
        .args(p.args("t"))
        .args(["--ring-threads", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs 2560 bytes of float32 data, the file holds 2556"),
        "{err}"
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

/// Under `mpiexec` (MPICH's, on loopback): a build with `--features mpi`, which `.ci/run` tests.
#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::time::{Duration, Instant};

    fn mpiexec(ranks: usize) -> Command {
        let mut c = Command::new("mpiexec");
        c.args(["-n", &ranks.to_string(), BIN]);
        c
    }

    #[test]
    fn mpi_ranks_equal_the_threaded_ring_bit_for_bit() {
        for (name, dims, causal) in shapes() {
            let p = Problem::new(&format!("mpi-{name}"), dims, causal);
            run(Command::new(BIN).args(p.args("single")));
            for ranks in 1..=4 {
                let (mpi, threads) = (format!("mpi{ranks}"), format!("threads{ranks}"));
                run(mpiexec(ranks).args(&p.args(&mpi)[..]).arg("--ring"));
                run(Command::new(BIN)
                    .args(p.args(&threads))
                    .args(["--ring-threads", &ranks.to_string()]));
                let reference = if ranks == 1 { "single" } else { &threads };
                for (a, b) in p.outputs(&mpi).iter().zip(p.outputs(reference)) {
                    assert_eq!(
                        bits(a),
                        bits(&b),
                        "{name}: {ranks} MPI ranks against {reference}"
                    );
                }
            }
            std::fs::remove_dir_all(&p.dir).unwrap();
        }
    }

    #[test]
    fn ranks_started_on_different_files_all_fail() {
        let p = Problem::new("mpi-disagree", (1, 2, 2, 48, 48, 8), false);
        let other = Problem::new("mpi-disagree-other", (1, 2, 2, 49, 48, 8), false);
        // Two ranks read one query file, the third another (MPMD: `mpiexec A : B`).
        let mut a = p.args("x");
        a.push("--ring".into());
        let mut b = a.clone();
        b[2] = other.path("q").display().to_string();
        let out = Command::new("mpiexec")
            .args(["-n", "2", BIN])
            .args(&a[..])
            .args([":", "-n", "1", BIN])
            .args(&b[..])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.matches("the ranks disagree on the problem").count(),
            3,
            "{err}"
        );
        assert!(err.contains("Nq is 48 here and 49 on rank 2"), "{err}");
        assert!(!p.path("x-o").exists());
        for d in [p.dir, other.dir] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    /// The process of rank `rank` of a job whose command line mentions `dir`.
    fn rank_pid(dir: &Path, rank: usize) -> Option<u32> {
        let want = format!("PMI_RANK={rank}");
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            let ours = String::from_utf8_lossy(&cmd).contains(&*dir.to_string_lossy())
                && std::fs::read_link(e.path().join("exe")).ok()?
                    == Path::new(BIN).canonicalize().ok()?;
            (ours && env.split(|&b| b == 0).any(|v| v == want.as_bytes())).then_some(pid)
        })
    }

    /// The CPU time process `pid` has used (0 once it is gone).
    fn cpu_seconds(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command's closing parenthesis: the state, …, utime and stime 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Starts a job long enough to interrupt (a causal forward and backward of 2 × 24576 rows
    /// on 4 ranks), sends `signal` to rank 1 while it computes, and returns the job's exit status,
    /// error output and the time from the signal to the end of every process.
    fn interrupted(name: &str, signal: &str, timeout_s: &str) -> (Output, Duration) {
        let p = Problem::new(name, (1, 2, 2, 24576, 24576, 64), true);
        let child = mpiexec(4)
            .args(&p.args("x")[..])
            .arg("--ring")
            .env("ATTENTIVE_RING_TIMEOUT", timeout_s)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let pid = loop {
            if let Some(pid) = rank_pid(&p.dir, 1) {
                break pid;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "rank 1 never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Once it has computed for a while (0.3 s of CPU time): past the start, in the ring.
        while cpu_seconds(pid) < 0.3 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "rank 1 never computed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let sent = Instant::now();
        assert!(Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success());
        let out = child.wait_with_output().unwrap();
        // Every rank's process gone, the stopped one included.
        while (0..4).any(|r| rank_pid(&p.dir, r).is_some()) {
            assert!(
                sent.elapsed() < Duration::from_secs(60),
                "ranks left running"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = sent.elapsed();
        assert!(!p.path("x-o").exists(), "an output appeared");
        std::fs::remove_dir_all(&p.dir).unwrap();
        (out, took)
    }

    #[test]
    fn a_killed_rank_ends_the_job() {
        let (out, took) = interrupted("mpi-kill", "-KILL", "300");
        assert!(!out.status.success());
        assert!(took < Duration::from_secs(30), "took {took:?}");
    }

    #[test]
    fn a_stopped_rank_times_out_and_ends_the_job() {
        let (out, took) = interrupted("mpi-stop", "-STOP", "2");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("hangs or was stopped"), "{err}");
        assert!(took < Duration::from_secs(40), "took {took:?}");
    }
}
