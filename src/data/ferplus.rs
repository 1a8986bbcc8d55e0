//! FER+ crowd labels (Barsoum et al., ICMI 2016): ten taggers' votes for every FER2013 image, in
//! FER2013's row order (`fer2013new.csv` of microsoft/FERPlus, MIT; header
//! `Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF`).
//!
//! [`apply`] turns a FER2013 [`Dataset`] into one with FER+'s eight classes: each kept row's label
//! is its majority (the one class with strictly the most votes), its `soft` row the vote
//! distribution over the eight emotions, its `single_labels` entry FER2013's own label mapped
//! by name, and its `strict_majority` entry whether the label also passes Barsoum et al.'s
//! majority rule ([`VoteRow::barsoum_majority`]). Rows whose most-voted column is "unknown" or
//! "not a face", or whose top count is shared, are left out of every split and counted in
//! [`LeftOut`].

use std::path::Path;

use sha2::{Digest, Sha256};

use super::Dataset;
use crate::config::canonical_class;
use crate::error::{Error, Result};

/// The classes of a FER+ dataset: FER2013's seven in FER2013's order, then contempt.
pub const FERPLUS_CLASSES: [&str; 8] = [
    "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral", "contempt",
];

/// The file's column for each of [`FERPLUS_CLASSES`], then the two non-emotion columns.
const VOTE_COLUMNS: [&str; 10] = [
    "anger",
    "disgust",
    "fear",
    "happiness",
    "sadness",
    "surprise",
    "neutral",
    "contempt",
    "unknown",
    "nf",
];

/// sha256 of `fer2013new.csv` at microsoft/FERPlus@ae2128a (the file the shipped FER+ model was
/// trained on).
pub const FERPLUS_SHA256: &str = "9206e20d62f56475939f516847d61753e4860caeac9718b560129541b776fc2c";

/// The largest label file read (the real one is 1.6 MB).
const MAX_BYTES: u64 = 64 << 20;

/// Largest vote count accepted in one cell (FER+ has 10 taggers per image).
const MAX_VOTES: u32 = 1000;

/// One image's votes: the eight emotions in [`FERPLUS_CLASSES`] order, then unknown and NF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteRow {
    pub usage: String,
    pub votes: [u32; 10],
}

/// What a row's votes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Majority {
    /// One emotion has strictly more votes than every other column.
    Class(usize),
    Unknown,
    NotAFace,
    /// The top count is shared by two or more columns (or there are no votes).
    Tie,
}

impl VoteRow {
    /// The column with strictly the most votes.
    pub fn majority(&self) -> Majority {
        let top = *self.votes.iter().max().unwrap_or(&0);
        let mut at_top = self.votes.iter().enumerate().filter(|(_, &v)| v == top);
        match (at_top.next(), at_top.next()) {
            (Some((i, _)), None) if top > 0 => match i {
                8 => Majority::Unknown,
                9 => Majority::NotAFace,
                c => Majority::Class(c),
            },
            _ => Majority::Tie,
        }
    }

    /// The emotion of Barsoum et al.'s "majority" protocol (the FER+ paper and its reference
    /// reader, used there for every validation and test set): a column holding a single vote is
    /// set to zero as an outlier, and the top column must then hold more than half of all the
    /// votes left, unknown and not-a-face included. `None` when no column does, or when it is
    /// unknown or not a face. Such a row always has [`Self::majority`] `Class` of the same class.
    pub fn barsoum_majority(&self) -> Option<usize> {
        let kept = self.votes.map(|v| if v <= 1 { 0 } else { v });
        let total: u32 = kept.iter().sum();
        let (top, &count) = kept.iter().enumerate().max_by_key(|(_, &v)| v)?;
        (top < 8 && count > 0 && 2 * count > total).then_some(top)
    }

    /// The vote distribution over the eight emotions (sums to 1), or `None` without emotion
    /// votes.
    pub fn distribution(&self) -> Option<[f32; 8]> {
        let total: u32 = self.votes[..8].iter().sum();
        if total == 0 {
            return None;
        }
        let mut d = [0f32; 8];
        for (d, &v) in d.iter_mut().zip(&self.votes[..8]) {
            *d = v as f32 / total as f32;
        }
        Some(d)
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads a FER+ vote file. With `verify`, its sha256 must be [`FERPLUS_SHA256`].
pub fn read_votes(path: &Path, verify: bool) -> Result<Vec<VoteRow>> {
    let bytes = crate::fsutil::read_regular(path, MAX_BYTES)?;
    if verify {
        let got = sha256_hex(&bytes);
        if got != FERPLUS_SHA256 {
            return Err(Error::file(
                path,
                format!(
                    "sha256 {got} is not that of FER+'s fer2013new.csv ({FERPLUS_SHA256}); \
                     pass --labels-unverified to use a modified copy"
                ),
            ));
        }
    }
    parse_votes(path, &bytes)
}

fn parse_votes(path: &Path, bytes: &[u8]) -> Result<Vec<VoteRow>> {
    let err = |line: usize, msg: String| Error::Data {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| err(1, format!("unreadable header: {e}")))?
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let col = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            err(
                1,
                format!(
                    "header has no {name:?} column (expected Usage,Image name,neutral,happiness,\
                     surprise,sadness,anger,disgust,fear,contempt,unknown,NF)"
                ),
            )
        })
    };
    let usage_col = col("usage")?;
    let mut vote_cols = [0usize; 10];
    for (c, name) in vote_cols.iter_mut().zip(VOTE_COLUMNS) {
        *c = col(name)?;
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| err(line, format!("{e}")))?;
        let field = |c: usize| record.get(c).unwrap_or("").trim();
        let mut votes = [0u32; 10];
        for (v, (&c, name)) in votes.iter_mut().zip(vote_cols.iter().zip(VOTE_COLUMNS)) {
            *v = match field(c).parse::<u32>() {
                Ok(n) if n <= MAX_VOTES => n,
                _ => {
                    return Err(err(
                        line,
                        format!(
                            "{name} votes {:?} (expected a whole number 0..={MAX_VOTES})",
                            crate::log::escape(field(c))
                        ),
                    ))
                }
            };
        }
        rows.push(VoteRow {
            usage: field(usage_col).to_string(),
            votes,
        });
    }
    if rows.is_empty() {
        return Err(err(2, "no vote rows".into()));
    }
    Ok(rows)
}

/// Rows [`apply`] left out, per split of the data (same order as its `split_names`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    pub split: String,
    pub unknown: usize,
    pub not_a_face: usize,
    pub tie: usize,
}

impl LeftOut {
    pub fn total(&self) -> usize {
        self.unknown + self.not_a_face + self.tie
    }
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows left out ({} unknown, {} not a face, {} without a single majority)",
            self.total(),
            self.unknown,
            self.not_a_face,
            self.tie
        )
    }
}

/// Reads the vote file at `path` (checked against [`FERPLUS_SHA256`] when `verify`), applies it
/// to `ds`, and says on stderr what each split left out.
pub fn relabel(ds: &Dataset, path: &Path, verify: bool) -> Result<(Dataset, Vec<LeftOut>)> {
    let votes = read_votes(path, verify)?;
    let (out, left) = apply(ds, &votes)?;
    for l in &left {
        crate::log!("FER+ labels {}: {l}", l.split);
    }
    Ok((out, left))
}

/// The FER+ version of `ds` (a FER2013 dataset in the original row order): see the module docs.
pub fn apply(ds: &Dataset, votes: &[VoteRow]) -> Result<(Dataset, Vec<LeftOut>)> {
    if votes.len() != ds.len() {
        return Err(Error::Config(format!(
            "the FER+ labels have {} rows and the data {}: they must be the same images in the \
             same order",
            votes.len(),
            ds.len()
        )));
    }
    let single: Vec<u8> = ds
        .class_names
        .iter()
        .map(|name| {
            let want = canonical_class(name);
            FERPLUS_CLASSES
                .iter()
                .position(|c| *c == want)
                .map(|i| i as u8)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "the data's class {:?} has no FER+ counterpart",
                        crate::log::escape(name)
                    ))
                })
        })
        .collect::<Result<_>>()?;
    let mut out = Dataset {
        class_names: FERPLUS_CLASSES.iter().map(|s| s.to_string()).collect(),
        split_names: ds.split_names.clone(),
        ..Default::default()
    };
    let mut left: Vec<LeftOut> = ds
        .split_names
        .iter()
        .map(|s| LeftOut {
            split: s.clone(),
            ..Default::default()
        })
        .collect();
    for (i, row) in votes.iter().enumerate() {
        let split = ds.splits[i] as usize;
        if ds.split_index(&row.usage).ok() != Some(split as u8) {
            return Err(Error::Config(format!(
                "FER+ row {} is {:?} but data row {} is {}: not the same row order",
                i + 1,
                crate::log::escape(&row.usage),
                i + 1,
                ds.split_names[split]
            )));
        }
        let class = match row.majority() {
            Majority::Class(c) => c,
            Majority::Unknown => {
                left[split].unknown += 1;
                continue;
            }
            Majority::NotAFace => {
                left[split].not_a_face += 1;
                continue;
            }
            Majority::Tie => {
                left[split].tie += 1;
                continue;
            }
        };
        let dist = row
            .distribution()
            .expect("a row with an emotion majority has emotion votes");
        out.pixels.extend_from_slice(ds.image(i));
        out.labels.push(class as u8);
        out.splits.push(split as u8);
        out.soft.extend_from_slice(&dist);
        out.single_labels.push(single[ds.labels[i] as usize]);
        out.strict_majority
            .push(row.barsoum_majority() == Some(class));
        if let Some(&seen) = ds.seen_in_training.get(i) {
            out.seen_in_training.push(seen);
        }
    }
    Ok((out, left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::FACE_PIXELS;

    const HEADER: &str =
        "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n";

    fn parse(text: &str) -> Result<Vec<VoteRow>> {
        parse_votes(Path::new("v.csv"), text.as_bytes())
    }

    #[test]
    fn votes_are_read_by_column_name_into_class_order() {
        let rows = parse(&format!(
            "{HEADER}Training,fer0.png,4,0,0,1,3,2,0,0,0,0\r\nPublicTest,,0,9,1,0,0,0,0,0,0,0\n"
        ))
        .unwrap();
        // anger 3, disgust 2, fear 0, happiness 0, sadness 1, surprise 0, neutral 4, contempt 0.
        assert_eq!(rows[0].votes, [3, 2, 0, 0, 1, 0, 4, 0, 0, 0]);
        assert_eq!(rows[0].majority(), Majority::Class(6));
        let d = rows[0].distribution().unwrap();
        assert!((d[6] - 0.4).abs() < 1e-6 && (d[0] - 0.3).abs() < 1e-6);
        assert_eq!(rows[1].usage, "PublicTest");
        assert_eq!(rows[1].majority(), Majority::Class(3));
    }

    #[test]
    fn majorities_unknown_not_a_face_and_ties() {
        let row = |v: [u32; 10]| VoteRow {
            usage: "Training".into(),
            votes: v,
        };
        assert_eq!(
            row([0, 0, 0, 0, 0, 0, 3, 0, 5, 2]).majority(),
            Majority::Unknown
        );
        assert_eq!(
            row([1, 0, 0, 0, 0, 0, 0, 0, 0, 9]).majority(),
            Majority::NotAFace
        );
        assert_eq!(
            row([4, 0, 0, 4, 0, 0, 2, 0, 0, 0]).majority(),
            Majority::Tie
        );
        assert_eq!(row([0; 10]).majority(), Majority::Tie);
        assert_eq!(
            row([0, 0, 0, 0, 0, 0, 0, 6, 4, 0]).majority(),
            Majority::Class(7)
        );
        assert_eq!(row([0, 0, 0, 0, 0, 0, 0, 0, 0, 10]).distribution(), None);
    }

    #[test]
    fn barsoum_majority_drops_single_votes_then_needs_more_than_half() {
        let row = |v: [u32; 10]| VoteRow {
            usage: "PublicTest".into(),
            votes: v,
        };
        // Order: anger, disgust, fear, happiness, sadness, surprise, neutral, contempt, unknown, NF.
        assert_eq!(
            row([0, 0, 0, 0, 0, 0, 10, 0, 0, 0]).barsoum_majority(),
            Some(6)
        );
        // A plurality (neutral 4 of 10) that is not a majority once the single sad vote goes:
        // 4 of 9 is not more than half.
        let r = row([3, 2, 0, 0, 1, 0, 4, 0, 0, 0]);
        assert_eq!(r.majority(), Majority::Class(6));
        assert_eq!(r.barsoum_majority(), None);
        // Six single votes dropped leave neutral's 4 alone.
        assert_eq!(
            row([1, 1, 1, 0, 0, 0, 4, 1, 1, 1]).barsoum_majority(),
            Some(6)
        );
        // Unknown and not-a-face votes count in the total, and can win.
        assert_eq!(
            row([0, 0, 0, 0, 0, 0, 3, 0, 2, 0]).barsoum_majority(),
            Some(6)
        );
        assert_eq!(row([0, 0, 0, 0, 0, 0, 3, 0, 2, 2]).barsoum_majority(), None);
        assert_eq!(row([0, 0, 0, 0, 0, 0, 2, 0, 6, 0]).barsoum_majority(), None);
        assert_eq!(row([0, 0, 0, 0, 0, 0, 0, 2, 0, 8]).barsoum_majority(), None);
        // Exactly half is not more than half; ties and empty rows have none.
        assert_eq!(row([0, 0, 0, 5, 0, 0, 5, 0, 0, 0]).barsoum_majority(), None);
        assert_eq!(row([0, 0, 0, 0, 0, 0, 5, 0, 5, 0]).barsoum_majority(), None);
        assert_eq!(row([0; 10]).barsoum_majority(), None);
        assert_eq!(row([1; 10]).barsoum_majority(), None);
        assert_eq!(
            row([0, 0, 0, 0, 0, 0, 0, 6, 4, 0]).barsoum_majority(),
            Some(7)
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = parse(&format!("{HEADER}Training,x,1,2,x,0,0,0,0,0,0,0\n")).unwrap_err();
        assert!(e.to_string().contains("v.csv:2: surprise votes"), "{e}");
        let e = parse("Usage,neutral\nTraining,1\n").unwrap_err();
        assert!(e.to_string().contains("no \"anger\" column"), "{e}");
        let e = parse(&format!("{HEADER}Training,x,1,2\n")).unwrap_err();
        assert!(e.to_string().contains("v.csv:2:"), "{e}");
        assert!(parse(HEADER).is_err());
    }

    #[test]
    fn apply_keeps_majorities_and_counts_what_it_leaves_out() {
        // Four FER2013 rows: Training angry, Training happy, PublicTest sad, PublicTest fear.
        let ds = Dataset {
            class_names: crate::config::FER2013_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            split_names: vec!["Training".into(), "PublicTest".into()],
            pixels: (0..4).flat_map(|i| vec![i as u8; FACE_PIXELS]).collect(),
            labels: vec![0, 3, 4, 2],
            splits: vec![0, 0, 1, 1],
            ..Default::default()
        };
        let rows = parse(&format!(
            "{HEADER}Training,a,6,0,0,0,4,0,0,0,0,0\nTraining,b,0,0,0,0,0,0,0,0,3,7\n\
             PublicTest,c,2,0,0,8,0,0,0,0,0,0\nPublicTest,d,5,0,0,5,0,0,0,0,0,0\n"
        ))
        .unwrap();
        let (fp, left) = apply(&ds, &rows).unwrap();
        assert_eq!(fp.class_names, FERPLUS_CLASSES);
        assert_eq!(fp.labels, vec![6, 4]); // neutral, sad
        assert_eq!(fp.single_labels, vec![0, 4]); // FER2013's angry, sad
        assert_eq!(fp.strict_majority, vec![true, true]);
        assert_eq!(fp.splits, vec![0, 1]);
        assert_eq!(fp.image(1)[0], 2);
        assert!((fp.soft[6] - 0.6).abs() < 1e-6 && (fp.soft[0] - 0.4).abs() < 1e-6);
        assert!((fp.soft[8 + 4] - 0.8).abs() < 1e-6);
        assert_eq!(
            (
                left[0].not_a_face,
                left[0].unknown,
                left[0].tie,
                left[1].tie
            ),
            (1, 0, 0, 1)
        );
        // Selecting a split carries the soft rows along.
        let val = fp.select_split("PublicTest").unwrap();
        assert_eq!(val.soft.len(), 8);
        assert_eq!(val.single_labels, vec![4]);
        assert_eq!(val.strict_majority, vec![true]);
        // A plurality that is not Barsoum et al.'s majority is kept, and marked.
        let plural = parse(&format!(
            "{HEADER}Training,a,4,0,0,3,2,0,0,0,1,0\nTraining,b,0,0,0,0,0,0,0,0,3,7\n\
             PublicTest,c,2,0,0,8,0,0,0,0,0,0\nPublicTest,d,5,0,0,5,0,0,0,0,0,0\n"
        ))
        .unwrap();
        let (fp, _) = apply(&ds, &plural).unwrap();
        assert_eq!(fp.labels, vec![6, 4]);
        assert_eq!(fp.strict_majority, vec![false, true]);
        // Another row order or count is refused.
        let e = apply(&ds, &rows[..3]).unwrap_err();
        assert!(e.to_string().contains("3 rows and the data 4"), "{e}");
        let mut swapped = rows.clone();
        swapped.swap(1, 2);
        let e = apply(&ds, &swapped).unwrap_err();
        assert!(e.to_string().contains("not the same row order"), "{e}");
    }

    #[test]
    fn the_checksum_is_checked_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.csv");
        std::fs::write(&p, format!("{HEADER}Training,a,6,0,0,0,4,0,0,0,0,0\n")).unwrap();
        let e = read_votes(&p, true).unwrap_err().to_string();
        assert!(e.contains("--labels-unverified"), "{e}");
        assert_eq!(read_votes(&p, false).unwrap().len(), 1);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
