//! The `fer-cam` binary: parse arguments, call the library, map errors to exit codes.

mod cli;

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use cli::{Cli, Command, DataSource, EvalArgs, InitArgs};
use fer_cam::config::{ModelConfig, Stem};
use fer_cam::data::{self, Dataset, LoadOptions};
use fer_cam::eval::{evaluate, EvalOptions};
use fer_cam::infer::{Classifier, SamplerConfig};
use fer_cam::model::{init_model, save_model_dir};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(a) => init(a),
        Command::Eval(a) => eval(a),
        Command::Data(a) => data_info(&a.source),
    };
    if let Err(e) = result {
        // A reader that closed stdout is not an error of ours.
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
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

fn load_data(src: &DataSource) -> Result<Dataset> {
    let opts = if src.no_cache {
        LoadOptions::default()
    } else if let Some(d) = &src.cache_dir {
        LoadOptions {
            cache_dir: Some(d.clone()),
        }
    } else {
        LoadOptions::with_default_cache()
    };
    let (ds, info) = data::load(&src.data, &opts)?;
    for w in &info.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
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
    eprintln!("wrote untrained model to {}", a.out.display());
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let mut clf = Classifier::load(&a.model, &dev)?;
    let defaults = clf.sampler();
    clf.set_sampler(SamplerConfig {
        samples: a.samples.unwrap_or(defaults.samples),
        steps: a.steps.unwrap_or(defaults.steps),
        seed: a.seed,
    })?;
    if a.batch_size == 0 {
        bail!("--batch-size 0 (must be at least 1)");
    }
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold {} (allowed 0..=1)", a.threshold);
    }
    let all = load_data(&a.source)?;
    let mut split = all.select_split(&a.split)?;
    if let Some(n) = a.limit {
        split = split.select(|i| i < n);
    }
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(split.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .context("progress bar template")?,
    );
    bar.set_message(format!("eval {}", a.split));
    let opts = EvalOptions {
        batch_size: a.batch_size,
        threshold: a.threshold,
        ..Default::default()
    };
    let mut report = evaluate(&mut clf, &split, &opts, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    report.model = a.model.display().to_string();
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
    for (i, name) in ds.split_names.iter().enumerate() {
        let part = ds.select(|k| ds.splits[k] == i as u8);
        text += &format!("\n{name:>12} {:>7}", part.len());
        for n in part.class_counts() {
            text += &format!(" {n:>8}");
        }
    }
    print_stdout(&text)
}
