//! `fer-cam data`: what a dataset holds, per split and class.

use anyhow::Result;

use super::{load_data, print_stdout};
use crate::cli::DataSource;

pub fn data_info(src: &DataSource) -> Result<()> {
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
