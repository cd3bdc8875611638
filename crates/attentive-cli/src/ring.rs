//! `attend --ring` and `--ring-threads`: the same `.npy` inputs and outputs as `attend`,
//! computed by ring attention ([`attentive_dist`]) with the sequence split between ranks: MPI
//! processes under `mpiexec -n P` (a build with the `mpi` feature) or threads of this process.
//!
//! Each rank reads only its own rows of the inputs (by offsets into the files, which every rank
//! must see), and writes only its own rows of the outputs into files that rank 0 creates beside
//! their destinations under temporary names; once every rank has written and flushed its rows,
//! rank 0 moves them into place, so the outputs appear whole or not at all, as with `attend`.

use crate::error::CliError;
use crate::npy::{self, F32File};
use attentive::View;
use attentive_dist::{all_ok, DistError, Layout, Ring, RingAttention};
use std::fs::File;
use std::path::{Path, PathBuf};

/// What `attend` was asked, as far as a ring computes it.
pub struct Job<'a> {
    pub q: &'a Path,
    pub k: &'a Path,
    pub v: &'a Path,
    pub out: &'a Path,
    pub lse: Option<&'a Path>,
    /// The gradient of the output and where dQ, dK and dV go.
    pub grads: Option<(&'a Path, [&'a Path; 3])>,
    pub causal: bool,
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
    /// Each rank reports its time computing and waiting for transfers on standard error.
    pub timings: bool,
}

/// Most ranks `--ring-threads` runs: each is a thread with a stack, in one process.
const MAX_THREAD_RANKS: usize = 1024;

/// Runs `job` on `ranks` threads of this process.
pub fn threads(job: &Job, ranks: usize) -> Result<(), CliError> {
    if !(1..=MAX_THREAD_RANKS).contains(&ranks) {
        return Err(CliError::Input {
            what: "--ring-threads".into(),
            reason: format!("takes 1 to {MAX_THREAD_RANKS} ranks, got {ranks}"),
        });
    }
    let results =
        attentive_dist::threaded(ranks, attentive_dist::timeout(), |ring| rank(ring, job));
    // Report the failure that started it, not its neighbours' news of it.
    let mut errors: Vec<CliError> = results.into_iter().filter_map(Result::err).collect();
    let echo = |e: &CliError| {
        matches!(
            e,
            CliError::Ring(DistError::PeerGone { .. } | DistError::Timeout { .. })
        )
    };
    let first = errors.iter().position(|e| !echo(e)).unwrap_or(0);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.swap_remove(first))
    }
}

/// Runs `job` as this process's rank of the MPI job. An error every rank knows of (the ranks
/// disagree on the problem, a tensor does not fit it) ends each rank with it; any other ends the
/// whole job at once, since the other ranks would wait for this one.
#[cfg(feature = "mpi")]
pub fn mpi(job: &Job) -> Result<(), CliError> {
    let mut ring = attentive_dist::mpi::MpiRing::init()?;
    match rank(&mut ring, job) {
        Ok(()) => Ok(()),
        Err(
            e @ CliError::Ring(
                DistError::Disagree { .. } | DistError::Shape { .. } | DistError::Unsupported(_),
            ),
        ) => Err(e),
        Err(e) => {
            eprintln!("error: rank {}: {e}", ring.rank());
            ring.abort(1)
        }
    }
}

fn rank(ring: &mut dyn Ring, job: &Job) -> Result<(), CliError> {
    let (r, ranks) = (ring.rank(), ring.size());
    let (qf, kf, vf) = (
        npy::f32_header(job.q)?,
        npy::f32_header(job.k)?,
        npy::f32_header(job.v)?,
    );
    let (qs, ks, vs) = (rank4(&qf, job.q)?, rank4(&kf, job.k)?, rank4(&vf, job.v)?);
    expect(job.v, &vs, &ks[..3], "the keys' [B, Hkv, Nk]")?;
    let attn = RingAttention::cross(qs[2], ks[2])
        .causal(job.causal)
        .scale(job.scale)
        .softcap(job.softcap);
    let (lq, lk) = attn.layouts(ranks);
    let (nq, nk) = (lq.rows(r), lk.rows(r));
    let q = read_rows(job.q, &qf, qs, &lq, r)?; // [B, Hq, nq, D]
    let k = read_rows(job.k, &kf, ks, &lk, r)?; // [B, Hkv, nk, D]
    let v = read_rows(job.v, &vf, vs, &lk, r)?; // [B, Hkv, nk, Dv]
    let local = |s: [usize; 4], n: usize| [s[0], s[1], n, s[3]];
    let (lqs, lks, lvs) = (local(qs, nq), local(ks, nk), local(vs, nk));
    let os = [qs[0], qs[1], qs[2], vs[3]];
    let (qv, kv, vv) = (
        View::contiguous(&q, &lqs)?,
        View::contiguous(&k, &lks)?,
        View::contiguous(&v, &lvs)?,
    );
    let mut o = zeros(&local(os, nq))?;
    let mut lse = zeros(&[qs[0], qs[1], nq])?;
    attn.forward(ring, qv, kv, vv, &mut o, &mut lse)?;
    let mut outputs = vec![Output::new(job.out, os, &lq, &o)];
    if let Some(p) = job.lse {
        outputs.push(Output::new(p, [qs[0], qs[1], qs[2], 1], &lq, &lse).three_dims());
    }
    let grads;
    if let Some((path, [pq, pk, pv])) = job.grads {
        let df = npy::f32_header(path)?;
        expect(path, &df.shape, &os, "the output's shape")?;
        let d_o = read_rows(path, &df, os, &lq, r)?;
        let (mut dq, mut dk, mut dv) = (zeros(&lqs)?, zeros(&lks)?, zeros(&lvs)?);
        let ov = View::contiguous(&o, &local(os, nq))?;
        let dov = View::contiguous(&d_o, &local(os, nq))?;
        attn.backward(ring, qv, kv, vv, ov, &lse, dov, &mut dq, &mut dk, &mut dv)?;
        grads = (dq, dk, dv);
        outputs.push(Output::new(pq, qs, &lq, &grads.0));
        outputs.push(Output::new(pk, ks, &lk, &grads.1));
        outputs.push(Output::new(pv, vs, &lk, &grads.2));
    }
    write(ring, &outputs)?;
    if job.timings {
        let t = ring.timings();
        let (work, wait) = (t.work.as_secs_f64(), t.wait.as_secs_f64());
        let line = format!(
            "rank {r} of {ranks}: {} rounds, {work:.3} s computing, {wait:.3} s waiting for transfers ({:.1}%)\n",
            t.rounds,
            100.0 * wait / (work + wait).max(f64::MIN_POSITIVE)
        );
        // One write, so that the ranks' lines do not interleave where their outputs merge.
        use std::io::Write;
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    Ok(())
}

fn rank4(f: &F32File, path: &Path) -> Result<[usize; 4], CliError> {
    f.shape.clone().try_into().map_err(|_| CliError::Input {
        what: path.display().to_string(),
        reason: format!(
            "expected 4 dimensions [B, H, N, D], got shape {:?}",
            f.shape
        ),
    })
}

/// Fails unless the file at `path`, of shape `shape`, begins with `want` (`what` names it).
fn expect(path: &Path, shape: &[usize], want: &[usize], what: &str) -> Result<(), CliError> {
    if shape.starts_with(want) {
        return Ok(());
    }
    Err(CliError::Input {
        what: path.display().to_string(),
        reason: format!("has shape {shape:?}, which must begin with {what}, {want:?}"),
    })
}

fn zeros(shape: &[usize]) -> Result<Vec<f32>, CliError> {
    let n = shape.iter().product::<usize>();
    attentive::check_memory("ring output", n, 4)?;
    Ok(vec![0.0; n])
}

/// The element ranges of rank `r`'s rows of a `[B, H, N, W]` array: for each (b, h), each chunk.
fn ranges(
    [b, h, n, w]: [usize; 4],
    l: &Layout,
    r: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    (0..b * h).flat_map(move |bh| {
        l.chunks(r)
            .into_iter()
            .map(move |c| (bh * n + c.start) * w..(bh * n + c.end) * w)
    })
}

fn read_rows(
    path: &Path,
    f: &F32File,
    shape: [usize; 4],
    l: &Layout,
    r: usize,
) -> Result<Vec<f32>, CliError> {
    let want = shape[0] * shape[1] * l.rows(r) * shape[3];
    attentive::check_memory("ring input rows", want, 4)?;
    npy::read_f32_ranges(path, f, ranges(shape, l, r))
}

/// One output file: its destination, whole shape, the layout of its rows and this rank's rows.
struct Output<'a> {
    dest: &'a Path,
    shape: [usize; 4],
    dims: usize,
    layout: &'a Layout,
    rows: &'a [f32],
}

impl<'a> Output<'a> {
    fn new(dest: &'a Path, shape: [usize; 4], layout: &'a Layout, rows: &'a [f32]) -> Self {
        Self {
            dest,
            shape,
            dims: 4,
            layout,
            rows,
        }
    }
    /// Saved as `[B, H, N]` (a log-sum-exp).
    fn three_dims(mut self) -> Self {
        self.dims = 3;
        self
    }
    /// The temporary name every rank derives alike.
    fn temp(&self) -> PathBuf {
        let parent = self.dest.parent().filter(|p| !p.as_os_str().is_empty());
        let name = self
            .dest
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy().into_owned());
        parent
            .unwrap_or(Path::new("."))
            .join(format!(".{name}.ring-tmp"))
    }
}

/// Rank 0 creates the files, every rank writes and flushes its rows, rank 0 moves the files into
/// place once all have; an error anywhere fails every rank and leaves no output.
fn write(ring: &mut dyn Ring, outputs: &[Output]) -> Result<(), CliError> {
    let r = ring.rank();
    let created = match r {
        0 => outputs
            .iter()
            .map(|o| npy::create_f32(&o.temp(), &o.shape[..o.dims]))
            .collect::<Result<Vec<u64>, _>>(),
        _ => Ok(Vec::new()),
    };
    if !all_ok(ring, created.is_ok())? {
        return Err(created
            .err()
            .unwrap_or_else(|| lost("rank 0 could not create the outputs")));
    }
    let written = outputs.iter().try_for_each(|o| {
        let tmp = o.temp();
        let io = |e: std::io::Error| CliError::Input {
            what: tmp.display().to_string(),
            reason: e.to_string(),
        };
        let f = File::options().write(true).open(&tmp).map_err(io)?;
        let data_at = npy::f32_header(&tmp)?.data_at;
        let mut at = 0;
        for range in ranges(o.shape, o.layout, r) {
            let n = range.len();
            npy::write_f32_at(&f, &tmp, data_at, range.start, &o.rows[at..at + n])?;
            at += n;
        }
        f.sync_all().map_err(io)
    });
    let everyone = all_ok(ring, written.is_ok())?;
    if r == 0 {
        for o in outputs {
            let tmp = o.temp();
            let moved = match everyone {
                true => std::fs::rename(&tmp, o.dest),
                false => std::fs::remove_file(&tmp),
            };
            moved.map_err(|e| CliError::Input {
                what: o.dest.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    written?;
    if everyone {
        Ok(())
    } else {
        Err(lost("another rank could not write its rows"))
    }
}

fn lost(reason: &str) -> CliError {
    CliError::Input {
        what: "ring outputs".into(),
        reason: reason.into(),
    }
}
