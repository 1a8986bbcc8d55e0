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
