//! The `fer-cam` binary: parse arguments, call the library, map errors to exit codes.

mod cli;
mod ship;

// mimalloc keeps freed pages for reuse; glibc's malloc unmaps the large short-lived tensor
// buffers of training and inference, and the page faults and TLB shootdowns that follow cost
// more than the arithmetic (measured: a training step at batch 64 went from 12.9 s to 7.2 s).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use cli::{Cli, Command, DataSource, EvalArgs, InitArgs, RunArgs, TrainArgs, TrainStage};
use fer_cam::config::{ModelConfig, Stem};
use fer_cam::data::{self, Dataset, LoadOptions};
use fer_cam::eval::{evaluate, EvalOptions};
use fer_cam::infer::{Classifier, SamplerConfig, SamplerKernel, Tta};
use fer_cam::model::{init_model, save_model_dir};
use fer_cam::train::{Progress, StageSelection, TrainConfig};

fn main() {
    // Freed tensors stay mapped for 30 s: longer than a training step, so steps reuse memory.
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    fix_thread_counts();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(a) => init(a),
        Command::Eval(a) => eval(a),
        Command::Data(a) => data_info(&a.source),
        Command::Train(a) => train(a),
        Command::Run(a) => run_daemon(a),
        Command::Devices => devices(),
        Command::Calibrate(a) => ship::calibrate(a),
        Command::Export(a) => ship::export(a),
        Command::Report(a) => report(a),
    };
    if let Err(e) = result {
        // A reader that closed stdout is not an error of ours.
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(0);
        }
        // One line: each cause once (an I/O error's text is already in its file's message).
        let mut line = String::new();
        for cause in e.chain().map(|c| c.to_string()) {
            if !line.contains(&cause) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&cause);
            }
        }
        fer_cam::log!("error: {}", line.replace('\n', " "));
        std::process::exit(1);
    }
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            bail!("--device cuda: this build has no CUDA support (build with --features cuda)")
        }
        other => bail!("--device {other:?} is unknown (allowed: cpu, cuda)"),
    }
}

fn load_options(src: &DataSource) -> LoadOptions {
    if src.no_cache {
        LoadOptions::default()
    } else if let Some(d) = &src.cache_dir {
        LoadOptions {
            cache_dir: Some(d.clone()),
        }
    } else {
        LoadOptions::with_default_cache()
    }
}

/// How reports name the model: its directory, or the built-in one.
fn model_name(model: Option<&Path>) -> String {
    model.map_or_else(
        || fer_cam::model::embedded::NAME.to_string(),
        |p| p.display().to_string(),
    )
}

/// Loads a model (a directory, or the built-in one) onto the named device with the sampler
/// overrides applied.
fn load_classifier(a: &cli::ClassifierArgs) -> Result<Classifier> {
    let dev = device(&a.device)?;
    let mut clf = match &a.model {
        Some(dir) => Classifier::load(dir, &dev)?,
        None => Classifier::load_embedded(&dev)?,
    };
    clf.set_weight_format(match a.weights {
        cli::StoredWeightsArg::F16 => fer_cam::kernels::WeightFormat::F16,
        cli::StoredWeightsArg::F32 => fer_cam::kernels::WeightFormat::F32,
    });
    clf.set_sampler_kernel(match a.sampler_kernel {
        cli::SamplerKernelArg::Fused => SamplerKernel::Fused,
        cli::SamplerKernelArg::Candle => SamplerKernel::Candle,
    })?;
    if let Some(tta) = a.tta {
        clf.set_tta(match tta {
            cli::TtaArg::None => Tta::None,
            cli::TtaArg::Flip => Tta::Flip,
            cli::TtaArg::TenCrop => Tta::TenCrop,
        })?;
    }
    let defaults = clf.sampler();
    clf.set_sampler(SamplerConfig {
        samples: a.samples.unwrap_or(defaults.samples),
        steps: a.steps.unwrap_or(defaults.steps),
        seed: a.seed,
    })?;
    Ok(clf)
}

fn load_data(src: &DataSource) -> Result<Dataset> {
    let opts = load_options(src);
    let (ds, info) = data::load(&src.data, &opts)?;
    for w in &info.warnings {
        fer_cam::log!("warning: {w}");
    }
    fer_cam::log!(
        "loaded {} images from {} in {:.3} s ({})",
        ds.len(),
        src.data.display(),
        info.seconds,
        if info.from_cache { "cache" } else { "parsed" }
    );
    Ok(ds)
}

fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!(
            "{} already exists (pass --force to replace it)",
            a.out.display()
        );
    }
    let mut cfg = ModelConfig::default();
    cfg.encoder.stem = a.stem.parse::<Stem>()?;
    cfg.encoder.cbam = !a.no_cbam;
    if let Some(classes) = a.classes {
        cfg.classes = classes;
    }
    if let Some(t) = a.timesteps {
        cfg.card.timesteps = t;
        cfg.card.steps = cfg.card.steps.min(t);
    }
    cfg.validate()?;
    let (vars, _) = init_model(&cfg, &Device::Cpu, a.seed)?;
    save_model_dir(&a.out, &cfg, &vars)?;
    fer_cam::log!("wrote untrained model to {}", a.out.display());
    Ok(())
}

/// A progress bar on stderr (hidden with `quiet`).
fn progress_bar(quiet: bool, len: usize, msg: String) -> Result<ProgressBar> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .context("progress bar template")?,
    );
    bar.set_message(msg);
    Ok(bar)
}

/// The labelled images of one split, or of its first `limit`.
fn load_split(src: &DataSource, split: &str, limit: Option<usize>) -> Result<Dataset> {
    let all = load_data(src)?;
    let mut data = all.select_split(split)?;
    if let Some(n) = limit {
        data = data.select(|i| i < n);
    }
    Ok(data)
}

fn eval(a: EvalArgs) -> Result<()> {
    let mut clf = load_classifier(&a.classifier)?;
    if a.batch_size == 0 {
        bail!("--batch-size 0 (must be at least 1)");
    }
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold {} (allowed 0..=1)", a.threshold);
    }
    let split = load_split(&a.source, &a.split, a.limit)?;
    let bar = progress_bar(a.quiet, split.len(), format!("eval {}", a.split))?;
    let opts = EvalOptions {
        batch_size: a.batch_size,
        threshold: a.threshold,
        ..Default::default()
    };
    let mut report = evaluate(&mut clf, &split, &opts, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    report.model = model_name(a.classifier.model.as_deref());
    report.data = a.source.data.display().to_string();
    report.split = a.split.clone();
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    print_stdout(&report.to_string())
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn data_info(src: &DataSource) -> Result<()> {
    let ds = load_data(src)?;
    let mut text = format!(
        "{}: {} images, {} classes\n",
        src.data.display(),
        ds.len(),
        ds.class_names.len()
    );
    text += &format!("{:>12} {:>7}", "split", "total");
    for c in &ds.class_names {
        text += &format!(" {:>8}", c.chars().take(8).collect::<String>());
    }
    // Counts per split and class, without copying any pixels.
    let mut counts = vec![vec![0usize; ds.class_names.len()]; ds.split_names.len()];
    for (&split, &label) in ds.splits.iter().zip(&ds.labels) {
        counts[split as usize][label as usize] += 1;
    }
    for (name, row) in ds.split_names.iter().zip(&counts) {
        text += &format!("\n{name:>12} {:>7}", row.iter().sum::<usize>());
        for n in row {
            text += &format!(" {n:>8}");
        }
    }
    print_stdout(&text)
}

fn train(a: TrainArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let mut cfg = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<TrainConfig>(&text)
                .with_context(|| format!("{}: not a valid training config", p.display()))?
        }
        None => TrainConfig::new(a.source.data.clone(), a.run_dir.clone()),
    };
    cfg.data = a.source.data.clone();
    cfg.run_dir = a.run_dir.clone();
    cfg.cache_dir = load_options(&a.source).cache_dir;
    if let Some(s) = &a.stem {
        cfg.model.encoder.stem = s.parse::<Stem>()?;
    }
    if a.no_cbam {
        cfg.model.encoder.cbam = false;
    }
    if let Some(n) = a.ssl_epochs {
        cfg.ssl.opt.epochs = n;
    }
    if let Some(n) = a.classifier_epochs {
        cfg.classifier.opt.epochs = n;
    }
    if let Some(n) = a.card_epochs {
        cfg.card.epochs = n;
    }
    if let Some(b) = a.batch_size {
        cfg.ssl.opt.batch_size = b;
        cfg.classifier.opt.batch_size = b;
    }
    if let Some(lr) = a.lr {
        cfg.ssl.opt.lr = lr;
        cfg.classifier.opt.lr = lr;
    }
    if a.train_limit.is_some() {
        cfg.train_limit = a.train_limit;
    }
    if a.val_limit.is_some() {
        cfg.val_limit = a.val_limit;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    let selection = match a.stage {
        TrainStage::Ssl => StageSelection::Ssl,
        TrainStage::Classifier => StageSelection::Classifier,
        TrainStage::Card => StageSelection::Card,
        TrainStage::All => StageSelection::All,
    };
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
        )
        .context("progress bar template")?,
    );
    let mut progress = |p: &Progress| {
        bar.set_length(p.steps as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!(
            "{} epoch {}/{} loss {:.4} {:.1} img/s",
            p.stage.name(),
            p.epoch + 1,
            p.epochs,
            p.loss,
            p.images_per_s
        ));
    };
    let summaries = fer_cam::train::run(
        &cfg,
        selection,
        a.init.as_deref(),
        a.from_scratch,
        &dev,
        a.resume,
        &mut progress,
    )?;
    bar.finish_and_clear();
    let mut text = String::new();
    for s in &summaries {
        if s.images_per_s > 0.0 {
            text += &format!(
                "{}: {} epochs, {:.1} images/s, {:.1}% of the time waiting for data",
                s.stage,
                s.epochs_run,
                s.images_per_s,
                100.0 * s.data_wait_share
            );
        } else {
            text += &format!(
                "{}: {} epochs (all done in an earlier run)",
                s.stage, s.epochs_run
            );
        }
        if let (Some(acc), Some(ep)) = (s.best_val_accuracy, s.best_epoch) {
            text += &format!(", PublicTest accuracy {:.2}% (epoch {ep})", 100.0 * acc);
        }
        text += &format!(", model {}\n", s.model_dir.display());
    }
    print_stdout(text.trim_end())
}

#[cfg(not(feature = "camera"))]
fn no_camera_support() -> anyhow::Error {
    anyhow::anyhow!(
        "this build has no camera support (rebuild with `--features camera`), or feed frames \
         through ffmpeg: see README, \"Sharing the camera\""
    )
}

#[cfg(feature = "camera")]
fn devices() -> Result<()> {
    let lines = fer_cam::capture::camera::list_devices()?;
    if lines.is_empty() {
        fer_cam::log!("no cameras found");
        return Ok(());
    }
    print_stdout(&lines.join("\n"))
}

#[cfg(not(feature = "camera"))]
fn devices() -> Result<()> {
    Err(no_camera_support())
}

/// `640x480` → (640, 480).
fn parse_resolution(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| {
        anyhow::anyhow!("--resolution {s:?} (expected WIDTHxHEIGHT, e.g. 640x480)")
    })?;
    let (w, h): (u32, u32) = (w.trim().parse()?, h.trim().parse()?);
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        bail!("--resolution {s} (each side 16..=8192)");
    }
    Ok((w, h))
}

fn report(a: cli::ReportArgs) -> Result<()> {
    use fer_cam::report::{write_report, Recording};
    let rec = match a.input.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
            Recording::read(std::io::BufReader::new(f), &p.display().to_string())?
        }
        None => Recording::read(std::io::stdin().lock(), "stdin")?,
    };
    let input = a
        .input
        .as_ref()
        .map_or("stdin".to_string(), |p| p.display().to_string());
    let files = write_report(&rec, &input, &a.out)?;
    let faces: usize = rec.frames.iter().map(|f| f.faces.len()).sum();
    fer_cam::log!(
        "report: {} frames, {} faces, {} tracks, {} malformed lines skipped; {} files in {}",
        rec.frames.len(),
        faces,
        rec.tracks().len(),
        rec.malformed,
        files.len(),
        a.out.display()
    );
    Ok(())
}

/// candle sizes every CPU matmul by the physical core count, which it re-reads from
/// /proc/cpuinfo on each call unless RAYON_NUM_THREADS is set (about 40 reads per daemon frame).
/// Decide both counts once, before any thread starts: rayon's pool keeps its default (logical
/// CPUs) and candle gets the physical count it would have computed.
fn fix_thread_counts() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(logical)
        .build_global();
    std::env::set_var(
        "RAYON_NUM_THREADS",
        num_cpus::get_physical().max(1).to_string(),
    );
}

fn run_daemon(a: RunArgs) -> Result<()> {
    use fer_cam::capture::{FrameSource, ImageSource, InputKind, Y4mSource};
    use fer_cam::face::{DetectConfig, TrackerConfig};
    use fer_cam::pipeline::RunConfig;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let clf = load_classifier(&a.classifier)?;
    let (cam_w, cam_h) = parse_resolution(&a.resolution)?;
    if !(1..=240).contains(&a.fps) {
        bail!("--fps {} (allowed 1..=240)", a.fps);
    }
    #[cfg(not(feature = "camera"))]
    if a.camera.is_some() {
        return Err(no_camera_support());
    }
    if a.input.is_empty() && a.camera.is_none() {
        bail!("give --input FILE.y4m, --input - (YUV4MPEG2 on stdin), image files, or --camera N");
    }
    let camera = a.camera;
    for p in &a.input {
        fer_cam::capture::refuse_compressed(p)?;
    }
    let kind = match a.input.as_slice() {
        [one] => InputKind::detect(one)?,
        _ => InputKind::Images,
    };
    let stdin = kind == InputKind::Stdin;
    let stream = kind == InputKind::Stream;
    let y4m = kind == InputKind::Y4mFile || stream;
    let cfg = RunConfig {
        detect: DetectConfig {
            detect_width: a
                .detect_width
                .unwrap_or(if stdin || y4m || camera.is_some() {
                    320
                } else {
                    0
                }),
            // Stills are unrelated pictures: detect on every one.
            every: if stdin || y4m || camera.is_some() {
                a.detect_every
            } else {
                1
            },
            min_face: a.min_face,
            score_threshold: a.det_threshold,
            ..Default::default()
        },
        tracker: TrackerConfig::default(),
        margin: a.margin,
        smooth: a.smooth,
        max_fps: a
            .max_fps
            .unwrap_or(if camera.is_some() { 10.0 } else { 0.0 }),
        realtime: a.realtime,
        live: stdin || stream || camera.is_some(),
        status_every: a.status_every,
        annotate: a.annotate.clone(),
        ..Default::default()
    };
    cfg.validate()?;
    let inputs = a.input.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    let cam_cancel = cancel.clone();
    let cam_fps = a.fps;
    let open = move || -> fer_cam::Result<Box<dyn FrameSource>> {
        #[cfg(feature = "camera")]
        if let Some(index) = camera {
            use fer_cam::capture::camera::CameraSource;
            use fer_cam::capture::{Backoff, Reconnecting};
            let reopen = move || -> fer_cam::Result<Box<dyn FrameSource>> {
                Ok(Box::new(CameraSource::open(index, cam_w, cam_h, cam_fps)?))
            };
            // The first open must succeed: a missing or busy camera is an error, not a retry loop.
            let first = CameraSource::open(index, cam_w, cam_h, cam_fps)?;
            let src = Reconnecting::new(format!("camera:{index}"), reopen, Backoff::default())
                .with_source(Box::new(first))
                .with_cancel(move || cam_cancel.load(std::sync::atomic::Ordering::SeqCst));
            return Ok(Box::new(src));
        }
        #[cfg(not(feature = "camera"))]
        let _ = (&cam_cancel, cam_fps, cam_w, cam_h);
        if stdin {
            Ok(Box::new(Y4mSource::new(std::io::stdin(), "stdin")?))
        } else if y4m {
            let p = &inputs[0];
            let f = std::fs::File::open(p).map_err(|e| fer_cam::Error::io(p, e))?;
            Ok(Box::new(Y4mSource::new(
                f,
                format!("file:{}", p.display()),
            )?))
        } else {
            Ok(Box::new(ImageSource::new(&inputs)?))
        }
    };
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone()).context("installing signal handlers")?;
    }
    let stdout = std::io::stdout().lock();
    let stats = fer_cam::pipeline::run(&cfg, open, clf, stdout, cancel)?;
    if let (Some(path), Some(an)) = (&a.annotate, &stats.annotate) {
        fer_cam::log!(
            "annotate: {} frames written to {}, {} dropped{}",
            an.written,
            path.display(),
            an.dropped,
            an.error
                .as_ref()
                .map(|e| format!("; stopped early: {e}"))
                .unwrap_or_default()
        );
    }
    if a.stats {
        fer_cam::log!(
            "frames {} in {:.2} s ({:.1} fps), faces {}, dropped {}, warnings {}; capture-to-emit ms: p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1}",
            stats.frames,
            stats.seconds,
            stats.frames as f64 / stats.seconds.max(1e-9),
            stats.faces,
            stats.dropped,
            stats.warnings,
            stats.latency.p50,
            stats.latency.p95,
            stats.latency.p99,
            stats.latency.max
        );
    }
    Ok(())
}
