//! Face-expression datasets: FER2013 in the Kaggle CSV layout (plain or gzip) and image folders
//! (`<root>/<split>/<class>/*.png|jpg`), held in one compact in-memory form and cached on disk.

pub mod augment;
mod cache;
mod fer_csv;
pub mod ferplus;
mod folder;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};

pub use cache::{default_cache_dir, CACHE_VERSION};

/// Side of the square grayscale crops every dataset is stored at.
pub const FACE_SIZE: usize = 48;
/// Pixels per image.
pub const FACE_PIXELS: usize = FACE_SIZE * FACE_SIZE;

/// Images, labels and split membership, stored flat: image `i` is
/// `pixels[i*FACE_PIXELS..(i+1)*FACE_PIXELS]`, row-major 8-bit gray.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    pub class_names: Vec<String>,
    pub split_names: Vec<String>,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    /// Index into `split_names` per image.
    pub splits: Vec<u8>,
    /// Label distributions (`len · classes`, each row summing to 1) where the data has them (a
    /// crowd's votes, as FER+); empty otherwise. `labels` then holds each row's majority.
    pub soft: Vec<f32>,
    /// A second, single annotator's label per image (FER2013's own label under FER+ votes),
    /// indexing `class_names`; empty when there is none.
    pub single_labels: Vec<u8>,
    /// Whether each row's label is also its majority under Barsoum et al.'s stricter protocol
    /// (FER+: [`ferplus::VoteRow::barsoum_majority`]); empty when the data has no such rule.
    pub strict_majority: Vec<bool>,
    /// Whether each row's pixels are also those of a Training image (FER2013 repeats some
    /// images across its splits, so a model has already seen them); empty when not marked
    /// ([`Dataset::mark_seen_in_training`]).
    pub seen_in_training: Vec<bool>,
}

/// Split-name aliases: the Kaggle CSV names and the usual folder names mean the same split.
const SPLIT_ALIASES: [&[&str]; 3] = [
    &["training", "train"],
    &["publictest", "val", "valid", "validation"],
    &["privatetest", "test"],
];

fn canonical_split(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    SPLIT_ALIASES
        .iter()
        .find(|group| group.contains(&lower.as_str()))
        .map_or(lower, |group| group[0].to_string())
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * FACE_PIXELS..(i + 1) * FACE_PIXELS]
    }

    /// Index of a split by name, accepting the Kaggle and folder aliases
    /// (Training/train, PublicTest/val, PrivateTest/test), case-insensitively.
    pub fn split_index(&self, name: &str) -> Result<u8> {
        let want = canonical_split(name);
        self.split_names
            .iter()
            .position(|s| canonical_split(s) == want)
            .map(|i| i as u8)
            .ok_or_else(|| {
                Error::Config(format!(
                    "split {name:?} not in the data (available: {})",
                    self.split_names.join(", ")
                ))
            })
    }

    /// A dataset holding only the named split (same class and split names).
    pub fn select_split(&self, name: &str) -> Result<Dataset> {
        let s = self.split_index(name)?;
        Ok(self.select(|i| self.splits[i] == s))
    }

    /// A dataset of the images for which `keep(i)` holds.
    pub fn select(&self, keep: impl Fn(usize) -> bool) -> Dataset {
        let mut out = Dataset {
            class_names: self.class_names.clone(),
            split_names: self.split_names.clone(),
            ..Default::default()
        };
        let c = self.class_names.len();
        for i in (0..self.len()).filter(|&i| keep(i)) {
            out.pixels.extend_from_slice(self.image(i));
            out.labels.push(self.labels[i]);
            out.splits.push(self.splits[i]);
            if let Some(row) = self.soft_row(i) {
                out.soft.extend_from_slice(row);
            }
            if let Some(&l) = self.single_labels.get(i) {
                out.single_labels.push(l);
            }
            if let Some(&m) = self.strict_majority.get(i) {
                out.strict_majority.push(m);
            }
            if let Some(&m) = self.seen_in_training.get(i) {
                out.seen_in_training.push(m);
            }
        }
        debug_assert!(out.soft.is_empty() || out.soft.len() == out.len() * c);
        out
    }

    /// Marks every row outside the Training split whose pixels equal a Training image's
    /// (`seen_in_training`); Training rows are marked too. Nothing is marked when the data has
    /// no Training split.
    pub fn mark_seen_in_training(&mut self) {
        let Ok(train) = self.split_index("Training") else {
            self.seen_in_training.clear();
            return;
        };
        let seen: std::collections::HashSet<&[u8]> = (0..self.len())
            .filter(|&i| self.splits[i] == train)
            .map(|i| self.image(i))
            .collect();
        self.seen_in_training = (0..self.len())
            .map(|i| self.splits[i] == train || seen.contains(self.image(i)))
            .collect();
    }

    /// The label distribution of image `i`, when the data has distributions.
    pub fn soft_row(&self, i: usize) -> Option<&[f32]> {
        let c = self.class_names.len();
        self.soft.get(i * c..(i + 1) * c)
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.class_names.len()];
        for &l in &self.labels {
            if let Some(x) = c.get_mut(l as usize) {
                *x += 1;
            }
        }
        c
    }

    /// Images per split.
    pub fn split_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.split_names.len()];
        for &s in &self.splits {
            if let Some(x) = c.get_mut(s as usize) {
                *x += 1;
            }
        }
        c
    }

    /// Internal consistency (used on cache reads).
    fn check(&self) -> std::result::Result<(), String> {
        let n = self.labels.len();
        if self.splits.len() != n
            || self.pixels.len() != n * FACE_PIXELS
            || !(self.soft.is_empty() || self.soft.len() == n * self.class_names.len())
            || !(self.single_labels.is_empty() || self.single_labels.len() == n)
            || !(self.strict_majority.is_empty() || self.strict_majority.len() == n)
            || !(self.seen_in_training.is_empty() || self.seen_in_training.len() == n)
        {
            return Err("inconsistent array lengths".into());
        }
        if self
            .labels
            .iter()
            .any(|&l| l as usize >= self.class_names.len())
        {
            return Err("label out of range".into());
        }
        if self
            .splits
            .iter()
            .any(|&s| s as usize >= self.split_names.len())
        {
            return Err("split out of range".into());
        }
        Ok(())
    }
}

/// How [`load`] may use the on-disk cache.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where cache files live; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
}

impl LoadOptions {
    /// Caching in [`default_cache_dir`] when one can be determined.
    pub fn with_default_cache() -> Self {
        Self {
            cache_dir: default_cache_dir(),
        }
    }
}

/// What [`load`] did.
#[derive(Debug, Clone)]
pub struct LoadInfo {
    pub from_cache: bool,
    pub seconds: f64,
    pub cache_file: Option<PathBuf>,
    /// Problems with the cache that did not stop the load (unwritable dir, stale or corrupt file).
    pub warnings: Vec<String>,
}

/// The layouts [`load`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Kaggle `fer2013.csv` (`emotion,pixels,Usage`), optionally gzip-compressed.
    FerCsv,
    /// `<root>/<split>/<class>/*.png|jpg|jpeg`.
    ImageFolder,
}

/// Detects the layout of `path`.
pub fn detect_layout(path: &Path) -> Result<Layout> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok(if meta.is_dir() {
        Layout::ImageFolder
    } else {
        Layout::FerCsv
    })
}

/// Loads a dataset from a FER2013 CSV (plain/gzip) or an image-folder root, through the cache.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<(Dataset, LoadInfo)> {
    let start = Instant::now();
    let layout = detect_layout(path)?;
    let mut warnings = Vec::new();
    let fingerprint = match layout {
        Layout::FerCsv => cache::file_fingerprint(path)?,
        Layout::ImageFolder => folder::fingerprint(path)?,
    };
    let cache_file = opts.cache_dir.as_ref().map(|d| cache::cache_path(d, path));
    if let Some(cf) = &cache_file {
        match cache::read(cf, fingerprint) {
            Ok(Some(ds)) => {
                return Ok((
                    ds,
                    LoadInfo {
                        from_cache: true,
                        seconds: start.elapsed().as_secs_f64(),
                        cache_file,
                        warnings,
                    },
                ))
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!("ignoring cache: {e}")),
        }
    }
    let ds = match layout {
        Layout::FerCsv => fer_csv::read(path)?,
        Layout::ImageFolder => folder::read(path)?,
    };
    if let Some(cf) = &cache_file {
        if let Err(e) = cache::write(cf, fingerprint, &ds) {
            warnings.push(format!("could not write cache: {e}"));
        }
    }
    Ok((
        ds,
        LoadInfo {
            from_cache: false,
            seconds: start.elapsed().as_secs_f64(),
            cache_file,
            warnings,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_aliases() {
        let ds = Dataset {
            class_names: vec!["a".into(), "b".into()],
            split_names: vec!["Training".into(), "PrivateTest".into()],
            pixels: vec![0; 2 * FACE_PIXELS],
            labels: vec![0, 1],
            splits: vec![0, 1],
            ..Default::default()
        };
        assert_eq!(ds.split_index("train").unwrap(), 0);
        assert_eq!(ds.split_index("test").unwrap(), 1);
        assert_eq!(ds.split_index("privatetest").unwrap(), 1);
        let e = ds.split_index("PublicTest").unwrap_err().to_string();
        assert!(e.contains("available: Training, PrivateTest"), "{e}");
        let t = ds.select_split("test").unwrap();
        assert_eq!(t.labels, vec![1]);
        assert_eq!(t.class_counts(), vec![0, 1]);
    }

    #[test]
    fn test_images_that_repeat_a_training_image_are_marked() {
        // Training: images 1 and 2; test: 2 (a repeat, another label), 3, 1 (a repeat).
        let mut ds = Dataset {
            class_names: vec!["a".into(), "b".into()],
            split_names: vec!["Training".into(), "PrivateTest".into()],
            pixels: [1u8, 2, 2, 3, 1]
                .iter()
                .flat_map(|&v| vec![v; FACE_PIXELS])
                .collect(),
            labels: vec![0, 1, 0, 1, 0],
            splits: vec![0, 0, 1, 1, 1],
            ..Default::default()
        };
        ds.mark_seen_in_training();
        assert_eq!(ds.seen_in_training, vec![true, true, true, false, true]);
        assert!(ds.check().is_ok());
        // Selecting a split carries the marks along.
        let t = ds.select_split("PrivateTest").unwrap();
        assert_eq!(t.seen_in_training, vec![true, false, true]);
        // One pixel's difference is another image; without a Training split nothing is marked.
        ds.pixels[3 * FACE_PIXELS + 7] = 1;
        ds.pixels[4 * FACE_PIXELS + 7] = 9;
        ds.mark_seen_in_training();
        assert_eq!(ds.seen_in_training, vec![true, true, true, false, false]);
        let mut t = ds.select_split("PrivateTest").unwrap();
        t.split_names = vec!["x".into(), "PrivateTest".into()];
        t.mark_seen_in_training();
        assert!(t.seen_in_training.is_empty());
    }
}
