//! `fer-cam report`: an HTML page and plots from a recorded `run` output.

use anyhow::{Context, Result};

use crate::cli;

pub fn report(a: cli::ReportArgs) -> Result<()> {
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
