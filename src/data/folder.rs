//! Image-folder datasets: `<root>/<split>/<class>/*.png|jpg|jpeg|bmp|pgm|ppm`. Class names are the sorted
//! union of class folders over all splits; images that are not 48x48 gray are converted and
//! resized (AffectNet-style folders ship larger colour crops).

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::{cache::Fnv, Dataset, FACE_PIXELS, FACE_SIZE};
use crate::error::{Error, Result};

const EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "pgm", "ppm"];

/// A folder's entries in name order, without hidden ones (`.git`, `._x.png`).
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| !crate::decode::is_hidden(p))
        .collect();
    v.sort();
    Ok(v)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A split or class folder's name, which becomes a class or split name: UTF-8 without control
/// characters (two names differing only in undecodable bytes would otherwise merge).
fn name_of(p: &Path) -> Result<String> {
    let name = p.file_name().unwrap_or_default();
    match name.to_str() {
        Some(n) if !n.chars().any(char::is_control) => Ok(n.to_string()),
        _ => Err(Error::file(
            p,
            "folder name is not printable UTF-8 text; rename it (it names a class or split)",
        )),
    }
}

/// (split, class, file) for every image, sorted; errors if the layout has no images.
fn list(root: &Path) -> Result<Vec<(String, String, PathBuf)>> {
    let mut out = Vec::new();
    for split_dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
        for class_dir in sorted_entries(&split_dir)?
            .into_iter()
            .filter(|p| p.is_dir())
        {
            let files: Vec<PathBuf> = sorted_entries(&class_dir)?
                .into_iter()
                .filter(|p| p.is_file())
                .collect();
            let images: Vec<PathBuf> = files.iter().filter(|p| is_image(p)).cloned().collect();
            if images.is_empty() && !files.is_empty() {
                // Its class would vanish without a word.
                return Err(Error::file(
                    &class_dir,
                    format!(
                        "holds {} file(s) but no image fer-cam reads ({}); convert them or \
                         move the folder out",
                        files.len(),
                        EXTENSIONS.map(|e| format!(".{e}")).join(", ")
                    ),
                ));
            }
            let (split, class) = (name_of(&split_dir)?, name_of(&class_dir)?);
            for file in images {
                out.push((split.clone(), class.clone(), file));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::file(
            root,
            "no images found (expected <root>/<split>/<class>/*.png|jpg)",
        ));
    }
    Ok(out)
}

/// Hash of every file's path, size and mtime: changes when the folder's content does.
pub fn fingerprint(root: &Path) -> Result<u64> {
    let mut h = Fnv::new();
    for (_, _, file) in list(root)? {
        let meta = std::fs::metadata(&file).map_err(|e| Error::io(&file, e))?;
        h.write(file.to_string_lossy().as_bytes());
        h.write_meta(&meta);
    }
    Ok(h.finish())
}

/// Decodes every image of the folder tree.
pub fn read(root: &Path) -> Result<Dataset> {
    let files = list(root)?;
    let mut split_names: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
    split_names.dedup();
    let mut class_names: Vec<String> = files.iter().map(|f| f.1.clone()).collect();
    class_names.sort();
    class_names.dedup();
    if class_names.len() > 255 || split_names.len() > 255 {
        return Err(Error::file(root, "more than 255 classes or splits"));
    }
    let mut ds = Dataset {
        class_names,
        split_names,
        ..Default::default()
    };
    ds.pixels.reserve(files.len() * FACE_PIXELS);
    for (split, class, file) in &files {
        let img = crate::capture::color::gray_image(crate::decode::decode_image(file)?);
        let img = if img.dimensions() == (FACE_SIZE as u32, FACE_SIZE as u32) {
            img
        } else {
            image::imageops::resize(
                &img,
                FACE_SIZE as u32,
                FACE_SIZE as u32,
                FilterType::Triangle,
            )
        };
        ds.pixels.extend_from_slice(img.as_raw());
        // Both names come from the lists built above, so the lookups cannot fail.
        let label = ds.class_names.iter().position(|c| c == class).unwrap_or(0);
        let split = ds.split_names.iter().position(|s| s == split).unwrap_or(0);
        ds.labels.push(label as u8);
        ds.splits.push(split as u8);
    }
    Ok(ds)
}
