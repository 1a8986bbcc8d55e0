//! Mutation fuzzing on stable Rust: real seed files (a y4m stream, a FER2013 CSV, a PNG, a model's
//! config.json and safetensors) are mutated — bit flips, byte runs, splices, truncations,
//! duplicated spans, "interesting" numbers written into text — and fed to the readers. For every
//! case: no panic, the error (if any) is one line naming the file, and no allocation above
//! [`ALLOC_CAP`] while the case runs.
//!
//! The suite runs a bounded pass: every target must run all `FUZZ_CASES` cases (from its own
//! RNG seed) within `FUZZ_SECS_DEFAULT` seconds, or the test fails. `FER_FUZZ_SECS=600 cargo
//! test --release --test fuzz` is the long mode: it runs until the time is up and saves every
//! failing input under `tests/fuzz-corpus/<target>/`. Every run replays that corpus first: the
//! inputs of past bugs (frame rates of zero, absurd sizes and counts, quoted CSV re-saves, broken
//! headers), at least one per target.
//!
//! One `#[test]` only: the allocation peak is process-wide, so targets run one after another.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Most bytes live at once during one case (the seeds are a few hundred KB).
const ALLOC_CAP: usize = 768 << 20;
const FUZZ_CASES: usize = 3000;
const FUZZ_SECS_DEFAULT: f64 = 60.0;

/// The system allocator, counting the bytes live and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len().max(1);
        let at = rng.random_range(0..len);
        match rng.random_range(0..7) {
            0 => {
                if let Some(b) = v.get_mut(at) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
            1 => {
                let n = rng.random_range(1..=16).min(v.len().saturating_sub(at));
                let byte = [0u8, 0xff, b'\n', b',', b' ', b'9', b'-'][rng.random_range(0..7)];
                v[at..at + n].fill(byte);
            }
            2 => v.truncate(at),
            3 => {
                let end = (at + rng.random_range(1..=64)).min(v.len());
                let span = v[at..end].to_vec();
                let to = rng.random_range(0..=v.len());
                v.splice(to..to, span);
            }
            4 => {
                let end = (at + rng.random_range(1..=64)).min(v.len());
                v.drain(at..end);
            }
            5 => {
                // Interesting numbers where text holds digits.
                let word = [
                    "0",
                    "-1",
                    "4294967295",
                    "18446744073709551615",
                    "1e308",
                    "NaN",
                    "99999999",
                    "16384",
                ][rng.random_range(0..8)];
                let to = at.min(v.len());
                v.splice(to..to, word.bytes());
            }
            _ => {
                let n = rng.random_range(1..=8);
                let to = at.min(v.len());
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(to..to, junk);
            }
        }
    }
    v
}

/// Runs one input (the path it was written to, and its bytes); returns its error text, if any.
type Runner = Box<dyn Fn(&Path, &[u8]) -> Option<String>>;

/// A target: a name, seed inputs, and a function that runs one input (written where a file is
/// needed) and returns its error text, if any.
struct Target {
    name: &'static str,
    /// The mutation RNG's seed: one per target, so no two targets draw the same mutations.
    seed: u64,
    file_name: &'static str,
    seeds: Vec<Vec<u8>>,
    run: Runner,
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

/// Runs one case; `Err` describes a broken invariant.
fn check(t: &Target, dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join(t.file_name);
    std::fs::write(&path, input).map_err(|e| e.to_string())?;
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&path, input)));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let err = out.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("panic: {msg}")
    })?;
    if peak > ALLOC_CAP {
        return Err(format!("allocated {} MB at once", peak >> 20));
    }
    if let Some(e) = err {
        if e.lines().count() > 1 {
            return Err(format!("error of {} lines: {e}", e.lines().count()));
        }
        if !e.contains(t.file_name) {
            return Err(format!("error does not name the file: {e}"));
        }
    }
    Ok(())
}

fn y4m_seed() -> Vec<u8> {
    let (w, h) = (16usize, 12usize);
    let mut v = format!("YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n").into_bytes();
    for f in 0..3 {
        v.extend_from_slice(b"FRAME\n");
        v.extend((0..w * h).map(|i| (i * 3 + f) as u8));
        v.extend(std::iter::repeat_n(100u8, 2 * (w / 2) * (h / 2)));
    }
    v
}

fn targets(dir: &Path) -> Vec<Target> {
    use fer_cam::capture::{FrameSource, SourceEvent, Y4mSource};
    let csv_path = dir.join("seed.csv");
    common::write_fer_csv(&csv_path, 2);
    let csv_seed = std::fs::read(&csv_path).unwrap();
    let png_path = dir.join("seed.png");
    image::GrayImage::from_fn(24, 20, |x, y| image::Luma([(x * 9 + y) as u8]))
        .save(&png_path)
        .unwrap();
    let jpg_path = dir.join("seed.jpg");
    image::RgbImage::from_fn(24, 20, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, 90]))
        .save(&jpg_path)
        .unwrap();
    let mut cfg = fer_cam::ModelConfig::default();
    cfg.encoder.stem = fer_cam::config::Stem::Conv7x7Pool;
    cfg.encoder.widths = [4, 4, 8, 8];
    cfg.encoder.blocks = [1, 1, 1, 1];
    cfg.encoder.cbam_reduction = 2;
    cfg.card.hidden = 8;
    let model = dir.join("model");
    let (vm, _) = fer_cam::model::init_model(&cfg, &Device::Cpu, 1).unwrap();
    fer_cam::model::save_model_dir(&model, &cfg, &vm).unwrap();
    let config_seed = std::fs::read(model.join("config.json")).unwrap();
    let weights_seed = std::fs::read(model.join("model.safetensors")).unwrap();
    let (cfg_text, weights) = (
        String::from_utf8(config_seed.clone()).unwrap(),
        weights_seed.clone(),
    );
    vec![
        Target {
            name: "y4m",
            seed: 11,
            file_name: "fuzz.y4m",
            seeds: vec![y4m_seed()],
            run: Box::new(|_, bytes| {
                let mut s = match Y4mSource::new(bytes, "fuzz.y4m") {
                    Ok(s) => s,
                    Err(e) => return Some(e.to_string()),
                };
                s.keep_color(true);
                for _ in 0..16 {
                    match s.next_event() {
                        Ok(SourceEvent::End) => return None,
                        Ok(_) => {}
                        Err(e) => return Some(e.to_string()),
                    }
                }
                None
            }),
        },
        Target {
            name: "csv",
            seed: 23,
            file_name: "fuzz.csv",
            seeds: vec![csv_seed],
            run: Box::new(|path, _| {
                let opts = fer_cam::data::LoadOptions { cache_dir: None };
                fer_cam::data::load(path, &opts)
                    .err()
                    .map(|e| e.to_string())
            }),
        },
        Target {
            name: "image",
            seed: 37,
            file_name: "fuzz.img",
            seeds: vec![
                std::fs::read(&png_path).unwrap(),
                std::fs::read(&jpg_path).unwrap(),
            ],
            run: Box::new(|path, _| {
                fer_cam::decode::decode_image(path)
                    .err()
                    .map(|e| e.to_string())
            }),
        },
        Target {
            name: "config",
            seed: 41,
            file_name: "config.json",
            seeds: vec![config_seed],
            run: Box::new(move |path, bytes| {
                let text = String::from_utf8_lossy(bytes);
                fer_cam::model::load_model_bytes(&text, &weights, path, &Device::Cpu)
                    .err()
                    .map(|e| e.to_string())
            }),
        },
        Target {
            name: "safetensors",
            seed: 53,
            file_name: "model.safetensors",
            seeds: vec![weights_seed],
            run: Box::new(move |path, bytes| {
                fer_cam::model::load_model_bytes(&cfg_text, bytes, path, &Device::Cpu)
                    .err()
                    .map(|e| e.to_string())
            }),
        },
    ]
}

#[test]
fn mutated_inputs_never_panic_and_fail_in_one_line() {
    let long = std::env::var("FER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok());
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let targets = targets(tmp.path());
    let mut seeds: Vec<u64> = targets.iter().map(|t| t.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds.len(), targets.len(), "two targets share a seed");
    for t in targets {
        // The regression corpus first.
        let corpus = corpus_dir(t.name);
        let entries: Vec<PathBuf> = std::fs::read_dir(&corpus)
            .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!entries.is_empty(), "{}: empty corpus", corpus.display());
        for path in &entries {
            let input = std::fs::read(path).unwrap();
            if let Err(why) = check(&t, tmp.path(), &input) {
                failures.push(format!("{} corpus {}: {why}", t.name, path.display()));
            }
        }
        let budget = Duration::from_secs_f64(long.unwrap_or(FUZZ_SECS_DEFAULT));
        let start = Instant::now();
        let mut rng = StdRng::seed_from_u64(t.seed);
        let mut cases = 0usize;
        while start.elapsed() < budget && (long.is_some() || cases < FUZZ_CASES) {
            let seed = &t.seeds[cases % t.seeds.len()];
            let input = mutate(seed, &mut rng);
            cases += 1;
            if let Err(why) = check(&t, tmp.path(), &input) {
                if long.is_some() {
                    std::fs::create_dir_all(&corpus).unwrap();
                    let name = format!(
                        "{:016x}",
                        fer_cam::rngs::mix_seed(&[cases as u64, input.len() as u64])
                    );
                    std::fs::write(corpus.join(name), &input).unwrap();
                }
                failures.push(format!("{} case {cases}: {why}", t.name));
            }
        }
        eprintln!(
            "fuzz {}: {} corpus inputs, {cases} cases in {:.1} s",
            t.name,
            entries.len(),
            start.elapsed().as_secs_f64()
        );
        if long.is_none() && cases < FUZZ_CASES {
            failures.push(format!(
                "{}: only {cases} of {FUZZ_CASES} cases ran in {FUZZ_SECS_DEFAULT} s",
                t.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}
