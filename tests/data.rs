//! Dataset loading: the CSV and image-folder layouts, error reporting, and the binary cache.

mod common;

use std::io::Write;
use std::path::Path;

use fer_cam::data::{load, LoadOptions};
use fer_cam::Error;

fn no_cache() -> LoadOptions {
    LoadOptions::default()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn load_err(path: &Path) -> String {
    let e = load(path, &no_cache()).unwrap_err();
    let s = e.to_string();
    assert_eq!(s.lines().count(), 1, "error must be one line: {s}");
    s
}

#[test]
fn csv_plain_and_gzip_load_with_splits() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fer.csv");
    common::write_fer_csv(&csv, 10);
    let (ds, info) = load(&csv, &no_cache()).unwrap();
    assert!(!info.from_cache);
    assert_eq!(ds.len(), 30);
    assert_eq!(ds.split_counts(), vec![10, 10, 10]);
    assert_eq!(ds.class_names[3], "happy");
    assert_eq!(ds.labels[..8], [0, 1, 2, 3, 4, 5, 6, 0]);
    assert_eq!(ds.select_split("PrivateTest").unwrap().len(), 10);

    // Same content gzip-compressed, with CRLF line ends and the columns in another order.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    lines.next();
    let mut reordered = String::from("Usage,emotion,pixels\r\n");
    for l in lines {
        let parts: Vec<&str> = l.split(',').collect();
        reordered += &format!("{},{},{}\r\n", parts[2], parts[0], parts[1]);
    }
    let gz = dir.path().join("fer.csv.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(reordered.as_bytes()).unwrap();
    enc.finish().unwrap();
    let (ds2, _) = load(&gz, &no_cache()).unwrap();
    assert_eq!(ds2, ds);
}

#[test]
fn bad_rows_fail_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.csv");
    let good = common::csv_row(3, "Training", 1);
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace(",Training", ",Training,extra"),
            "expected 3 fields, found 4",
        ),
        (good.replacen("3,", "7,", 1), "unknown class \"7\""),
        (good.replacen("3,", "x,", 1), "unknown class \"x\""),
        (
            good.replace("Training", "Trainng"),
            "unknown Usage \"Trainng\"",
        ),
        (
            good.replacen(",", ",1 ", 1),
            "expected 2304 pixels (48x48), found 2305",
        ),
        (
            good.rsplit_once(' ').unwrap().0.to_string() + ",Training\n",
            "expected 2304 pixels (48x48), found 2303",
        ),
        (good.replacen(",", ",300 ", 1), "pixel 1 is \"300\""),
    ];
    for (bad, want) in cases {
        write(&p, &format!("emotion,pixels,Usage\n{good}{bad}"));
        let e = load_err(&p);
        assert!(e.contains("bad.csv:3:"), "{e}");
        assert!(e.contains(want), "wanted {want:?} in {e}");
    }
    write(&p, "");
    assert!(load_err(&p).contains("empty file"));
    write(&p, "emotion,Usage\n");
    assert!(load_err(&p).contains("no \"pixels\" column"));
    write(&p, "emotion,pixels,Usage\n");
    assert!(load_err(&p).contains("no data rows"));
    let missing = load(&dir.path().join("nope.csv"), &no_cache()).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }));
}

#[test]
fn truncated_gzip_is_an_error_not_a_short_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fer.csv");
    common::write_fer_csv(&csv, 5);
    let gz = dir.path().join("fer.csv.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&std::fs::read(&csv).unwrap()).unwrap();
    let bytes = enc.finish().unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&gz);
    assert!(e.contains("fer.csv.gz:"), "{e}");
}

#[test]
fn cache_makes_second_load_hit_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fer.csv");
    common::write_fer_csv(&csv, 4);
    let opts = LoadOptions {
        cache_dir: Some(dir.path().join("cache")),
    };
    let (a, i1) = load(&csv, &opts).unwrap();
    assert!(
        !i1.from_cache && i1.warnings.is_empty(),
        "{:?}",
        i1.warnings
    );
    let (b, i2) = load(&csv, &opts).unwrap();
    assert!(i2.from_cache);
    assert_eq!(a, b);
    // Flip a byte in the cached pixels: detected, reported, re-parsed, rewritten.
    let cf = i2.cache_file.unwrap();
    let mut bytes = std::fs::read(&cf).unwrap();
    let k = bytes.len() - 100;
    bytes[k] ^= 0xff;
    std::fs::write(&cf, &bytes).unwrap();
    let (c, i3) = load(&csv, &opts).unwrap();
    assert!(!i3.from_cache);
    assert!(
        i3.warnings[0].contains("corrupt cache"),
        "{:?}",
        i3.warnings
    );
    assert_eq!(c, a);
    // A truncated cache too.
    std::fs::write(&cf, &bytes[..30]).unwrap();
    let (_, i4) = load(&csv, &opts).unwrap();
    assert!(!i4.from_cache && !i4.warnings.is_empty());
    assert!(load(&csv, &opts).unwrap().1.from_cache);
    // Changing the source invalidates the cache.
    common::write_fer_csv(&csv, 5);
    let (d, i5) = load(&csv, &opts).unwrap();
    assert!(!i5.from_cache);
    assert_eq!(d.len(), 15);
    assert!(load(&csv, &opts).unwrap().1.from_cache);
    // Even an edit in place that keeps the size and puts the old mtime back.
    let mtime = std::fs::metadata(&csv).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let at = text.find('\n').unwrap() + 1; // first data row's label digit
    let old = text.as_bytes()[at];
    let mut edited = text.into_bytes();
    edited[at] = if old == b'0' { b'1' } else { b'0' };
    std::fs::write(&csv, &edited).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&csv)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let (e, i6) = load(&csv, &opts).unwrap();
    assert!(
        !i6.from_cache,
        "an in-place edit was served from the stale cache"
    );
    assert_ne!(e.labels[0], d.labels[0]);
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bom.csv");
    common::write_fer_csv(&csv, 2);
    let mut bytes = "\u{feff}".as_bytes().to_vec();
    bytes.extend(std::fs::read(&csv).unwrap());
    std::fs::write(&csv, bytes).unwrap();
    assert_eq!(load(&csv, &no_cache()).unwrap().0.len(), 6);
}

#[test]
fn image_folder_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("faces");
    let put = |split: &str, class: &str, name: &str, img: image::DynamicImage| {
        let d = root.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        img.save(d.join(name)).unwrap();
    };
    let gray = image::GrayImage::from_fn(48, 48, |x, y| image::Luma([(x + y) as u8]));
    put("train", "happy", "a.png", gray.clone().into());
    put("train", "angry", "b.png", gray.clone().into());
    put("test", "happy", "c.png", gray.clone().into());
    // A larger colour crop is converted and resized.
    let rgb = image::RgbImage::from_pixel(96, 64, image::Rgb([200, 100, 50]));
    put("test", "contempt", "d.jpg", rgb.into());
    std::fs::write(root.join("test/happy/notes.txt"), "ignored").unwrap();
    // What real folders carry beside the images is skipped: a git checkout's .git, macOS
    // `._x.png` companions, a folder whose name ends in .png.
    std::fs::create_dir_all(root.join(".git/objects")).unwrap();
    std::fs::write(
        root.join("train/happy/._a.png"),
        b"\0\x05\x16\x07 resource fork",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("train/happy/album.png")).unwrap();
    let (ds, _) = load(&root, &no_cache()).unwrap();
    assert_eq!(ds.class_names, vec!["angry", "contempt", "happy"]);
    assert_eq!(ds.split_names, vec!["test", "train"]);
    assert_eq!(ds.len(), 4);
    assert_eq!(ds.select_split("Training").unwrap().labels, vec![0, 2]);
    assert_eq!(ds.select_split("PrivateTest").unwrap().len(), 2);
    assert_eq!(ds.image(2), gray.as_raw().as_slice());
    // An unreadable image names its file.
    std::fs::write(root.join("train/angry/broken.png"), b"not a png").unwrap();
    let e = load_err(&root);
    assert!(
        e.contains("broken.png") && e.contains("cannot decode"),
        "{e}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(load_err(&empty).contains("no images found"));
    std::fs::remove_file(root.join("train/angry/broken.png")).unwrap();
    // A .bmp class is read; a class of only files fer-cam cannot read is an error, not a
    // class that vanishes.
    put("train", "sad", "e.bmp", gray.clone().into());
    let (ds, _) = load(&root, &no_cache()).unwrap();
    assert!(ds.class_names.contains(&"sad".to_string()));
    std::fs::create_dir_all(root.join("train/fear")).unwrap();
    std::fs::write(root.join("train/fear/f.webp"), b"RIFF....WEBP").unwrap();
    let e = load_err(&root);
    assert!(
        e.contains("fear") && e.contains("no image fer-cam reads"),
        "{e}"
    );
    std::fs::remove_dir_all(root.join("train/fear")).unwrap();
    // Class folders whose names are not UTF-8 text would merge: refused, named.
    use std::os::unix::ffi::OsStrExt;
    for raw in [&b"sad\xff"[..], &b"sad\xfe"[..]] {
        let d = root.join("train").join(std::ffi::OsStr::from_bytes(raw));
        std::fs::create_dir_all(&d).unwrap();
        gray.save(d.join("g.png")).unwrap();
    }
    assert!(load_err(&root).contains("not printable UTF-8"));
}

/// The real FER2013 file: official split and class counts, and the cache's cold/warm loads.
#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn fer2013_from_shared_has_official_counts() {
    let Some(shared) = common::shared_dir() else {
        common::skip_loudly(
            "fer2013_from_shared_has_official_counts",
            Path::new("../shared"),
        );
        return;
    };
    let path = shared.join("data/fer2013/fer2013.csv.gz");
    if !path.exists() {
        common::skip_loudly("fer2013_from_shared_has_official_counts", &path);
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        cache_dir: Some(cache.path().to_path_buf()),
    };
    let (ds, cold) = load(&path, &opts).unwrap();
    assert_eq!(ds.len(), 35_887);
    assert_eq!(ds.split_counts(), vec![28_709, 3_589, 3_589]);
    let private = ds.select_split("PrivateTest").unwrap();
    assert_eq!(
        private.class_counts(),
        vec![491, 55, 528, 879, 594, 416, 626]
    );
    let training = ds.select_split("Training").unwrap();
    assert_eq!(
        training.class_counts(),
        vec![3995, 436, 4097, 7215, 4830, 3171, 4965]
    );
    // First row of the original file: label 0, Training, pixels start 70 80 82 72 58.
    assert_eq!(ds.labels[0], 0);
    assert_eq!(&ds.image(0)[..5], &[70, 80, 82, 72, 58]);
    let (again, warm) = load(&path, &opts).unwrap();
    assert!(warm.from_cache);
    assert_eq!(again, ds);
    eprintln!(
        "FER2013 load: cold {:.3} s, warm (cache) {:.3} s",
        cold.seconds, warm.seconds
    );
}

#[test]
fn endless_lines_fifos_and_devices_are_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    // A gzip bomb: 64 MB of zeros without a newline, about 64 KB compressed.
    let gz = dir.path().join("bomb.csv.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::best(),
    );
    let zeros = vec![b'0'; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&zeros).unwrap();
    }
    enc.finish().unwrap();
    let e = load_err(&gz);
    assert!(e.contains("longer than"), "{e}");
    // A FIFO with no writer would block the open; /dev/zero would never end.
    let fifo = dir.path().join("fifo.csv");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    assert!(load_err(&fifo).contains("not a regular file"));
    assert!(load_err(Path::new("/dev/zero")).contains("not a regular file"));
}
