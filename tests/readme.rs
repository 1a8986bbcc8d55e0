//! README's promises, run as written: the first run on the bundled face, and the Python and
//! JavaScript readers of the JSON lines.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The code block after `<!-- reader:NAME -->`.
fn reader(name: &str) -> String {
    let text = readme();
    let marker = format!("<!-- reader:{name} -->");
    let after = &text[text
        .find(&marker)
        .unwrap_or_else(|| panic!("{marker} missing"))..];
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_string()
}

/// The JSON lines of README's first run (the bundled face, the built-in model).
fn first_run() -> Vec<u8> {
    let face = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blazeface_input.pgm");
    assert!(
        readme().contains("fer-cam run --input tests/fixtures/blazeface_input.pgm"),
        "README's first run changed: update this test"
    );
    let o = Command::new(common::bin())
        .args(["run", "--input"])
        .arg(&face)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// Runs `program args...` with `input` on stdin; its stdout, or `None` when the program is
/// not installed.
fn feed(program: &str, args: &[&str], input: &[u8]) -> Option<String> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("{program}: {e}"),
    };
    child.stdin.take().unwrap().write_all(input).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8(o.stdout).unwrap())
}

/// What both readers print for the first run: one line for its one face.
fn check_reader_output(out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let l = lines[0];
    assert!(
        l.contains("blazeface_input.pgm: face 1 ")
            && (l.ends_with("(certain)") || l.ends_with("(uncertain)")),
        "{l}"
    );
}

#[test]
fn the_first_run_gives_start_frame_and_summary_with_a_face() {
    let out = String::from_utf8(first_run()).unwrap();
    let types: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
        .collect();
    assert_eq!(types, ["\"start\"", "\"frame\"", "\"summary\""]);
    let frame: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(frame["faces"].as_array().unwrap().len(), 1);
}

#[test]
fn the_python_reader_reads_a_run() {
    let code = reader("python");
    let out = feed("python3", &["-c", &code], &first_run())
        .expect("python3 is on every machine this project builds on");
    check_reader_output(&out);
}

#[test]
fn the_javascript_reader_reads_a_run() {
    let code = reader("javascript");
    match feed("node", &["-e", &code], &first_run()) {
        Some(out) => check_reader_output(&out),
        None => {
            assert!(
                std::env::var_os("FER_CAM_REQUIRE_NODE").is_none(),
                "node is required here (FER_CAM_REQUIRE_NODE) but not on PATH"
            );
            common::skip_without("the_javascript_reader_reads_a_run", "node on PATH")
        }
    }
}
