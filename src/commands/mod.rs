//! The binary's subcommands, one file each, and what they share: loading a model or a dataset,
//! progress bars, writing stdout and JSON files.

pub mod data;
pub mod eval;
pub mod init;
pub mod report;
pub mod run;
pub mod ship;
pub mod train;

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{self, DataSource};
use fer_cam::data::{self as dataset, Dataset, LoadOptions};
use fer_cam::infer::{Classifier, SamplerConfig, SamplerKernel};

/// The compute device `--device` names: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => (k, Some(n)),
        None => (name, None),
    };
    match (kind, ordinal) {
        ("cpu", None) => Ok(Device::Cpu),
        ("cuda", n) => {
            let n = match n {
                None => 0,
                Some(s) => s.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("--device {name:?}: the GPU number must be a whole number")
                })?,
            };
            cuda_device(n)
        }
        _ => bail!("--device {name:?} is unknown (allowed: cpu, cuda, cuda:N)"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Ok(fer_cam::cuda::open_device(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    bail!("--device cuda: this build has no CUDA support (build with --features cuda)")
}

pub fn load_options(src: &DataSource) -> LoadOptions {
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

/// How reports name the model: its directory, or `builtin:NAME`.
pub fn model_name(model: Option<&Path>) -> String {
    use fer_cam::model::embedded;
    match model {
        None => embedded::display_name(embedded::DEFAULT),
        Some(p) => match embedded::named(p) {
            Some(name) => embedded::display_name(&name),
            None => p.display().to_string(),
        },
    }
}

/// Loads a model (a directory, or the built-in one) onto the named device with the sampler
/// overrides applied.
pub fn load_classifier(a: &cli::ClassifierArgs) -> Result<Classifier> {
    let dev = device(&a.device)?;
    let mut clf = match &a.model {
        Some(arg) => match fer_cam::model::embedded::named(arg) {
            Some(name) => Classifier::load_builtin(&name, &dev)?,
            None => Classifier::load(arg, &dev)?,
        },
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
        clf.set_tta(tta.into())?;
    }
    let defaults = clf.sampler();
    clf.set_sampler(SamplerConfig {
        samples: a.samples.unwrap_or(defaults.samples),
        steps: a.steps.unwrap_or(defaults.steps),
        seed: a.seed,
    })?;
    Ok(clf)
}

pub fn load_data(src: &DataSource) -> Result<Dataset> {
    Ok(load_labelled(src, false)?.0)
}

/// The data set with `--labels` applied, and the rows the labels left out per split (empty
/// without `--labels`); with `mark_seen`, the rows whose pixels a Training image repeats are
/// marked ([`Dataset::mark_seen_in_training`]).
pub fn load_labelled(
    src: &DataSource,
    mark_seen: bool,
) -> Result<(Dataset, Vec<dataset::ferplus::LeftOut>)> {
    let opts = load_options(src);
    let (mut ds, info) = dataset::load(&src.data, &opts)?;
    if mark_seen {
        ds.mark_seen_in_training();
    }
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
    let Some(labels) = &src.labels else {
        return Ok((ds, Vec::new()));
    };
    Ok(dataset::ferplus::relabel(
        &ds,
        labels,
        !src.labels_unverified,
    )?)
}

pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// A progress bar on stderr (hidden with `quiet`).
pub fn progress_bar(quiet: bool, len: usize, msg: String) -> Result<ProgressBar> {
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

/// The labelled images of one split, or of its first `limit`, and what `--labels` left out of
/// that split.
pub fn load_split(
    src: &DataSource,
    split: &str,
    limit: Option<usize>,
) -> Result<(Dataset, Option<dataset::ferplus::LeftOut>)> {
    let (all, left) = load_labelled(src, true)?;
    let s = all.split_index(split)?;
    let mut data = all.select(|i| all.splits[i] == s);
    if let Some(n) = limit {
        data = data.select(|i| i < n);
    }
    Ok((data, left.into_iter().nth(s as usize)))
}

/// Checks an output path before the work: it can be written (a read-only or missing folder
/// fails now, not after the work), and it is not one of the command's inputs (the same file, by
/// device and inode, whatever the spelling): `eval --json data.csv` would replace the data set.
pub fn check_output(out: &Path, a: &cli::ClassifierArgs, data: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    fer_cam::fsutil::check_writable(out)?;
    let Ok(o) = std::fs::metadata(out) else {
        return Ok(());
    };
    let mut inputs = vec![data.to_path_buf()];
    if let Some(m) = &a.model {
        inputs.extend([m.join("config.json"), m.join("model.safetensors")]);
    }
    for input in inputs {
        if std::fs::metadata(&input).is_ok_and(|i| i.dev() == o.dev() && i.ino() == o.ino()) {
            anyhow::bail!(
                "{} is also an input ({}): choose another output path",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path` (atomically: a reader sees the old or the new file);
/// unless `replace`, a file that exists (also one written meanwhile) is left alone and the write
/// fails.
pub fn write_json(path: &Path, value: &impl serde::Serialize, replace: bool) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    if replace {
        fer_cam::fsutil::write_file_atomically(path, text.as_bytes())?;
    } else {
        fer_cam::fsutil::create_file_atomically(path, text.as_bytes())?;
    }
    Ok(())
}
