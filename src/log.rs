//! Lines for stderr that never stop the work: `eprintln!` panics when stderr is gone (a closed
//! pipe, a terminal that went away), and a recogniser must not die because nobody reads its log.

/// Writes one formatted line to stderr and ignores a failure to do so.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `text` with every control character (newline, ESC, …) written as a Rust escape, so a name
/// taken from a file or the command line cannot forge lines or drive a terminal when printed.
pub fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::escape("a\nb\u{1b}[2J é"), "a\\nb\\u{1b}[2J é");
    }
}
