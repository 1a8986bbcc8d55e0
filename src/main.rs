//! The `fer-cam` binary: parse arguments, call the library, map errors to exit codes.

mod cli;
mod commands;

// mimalloc keeps freed pages for reuse; glibc's malloc unmaps the large short-lived tensor
// buffers of training and inference, and the page faults and TLB shootdowns that follow cost
// more than the arithmetic (measured: a training step at batch 64 went from 12.9 s to 7.2 s).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use cli::{Cli, Command};
use commands::{data, eval, init, report, run, ship, train};

fn main() {
    // Freed tensors stay mapped for 30 s: longer than a training step, so steps reuse memory.
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    fix_thread_counts();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    let result = match cli.command {
        Command::Init(a) => init::init(a),
        Command::Eval(a) => eval::eval(a),
        Command::Data(a) => data::data_info(&a.source),
        Command::Train(a) => train::train(a),
        Command::Run(a) => run::run_daemon(a),
        Command::Devices => run::devices(),
        Command::Calibrate(a) => ship::calibrate(a),
        Command::Export(a) => ship::export(a),
        Command::Average(a) => ship::average(a),
        Command::Report(a) => report::report(a),
    };
    if let Err(e) = result {
        // A reader that closed stdout is not an error of ours.
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(0);
        }
        // One line: each cause once (an I/O error's text is already in its file's message).
        let mut line = String::new();
        for cause in e.chain().map(|c| c.to_string()) {
            if !line.contains(&cause) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&cause);
            }
        }
        // Names from files and the command line may hold newlines or ESC sequences: escaped,
        // so an error stays one line and cannot drive the terminal.
        fer_cam::log!("error: {}", fer_cam::log::escape(&line));
        std::process::exit(1);
    }
}

/// Help and version go to stdout (exit 0); a usage error goes to stderr with exit status 1,
/// like every other error (clap's own exit status is 2), without clap's usage block.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 });
    }
    fer_cam::log!("{}", usage_message(&e.render().to_string()));
    std::process::exit(1);
}

/// clap's rendered usage error, shortened: the `error:` line with what it lists (missing
/// arguments, allowed values) on the same line, each `tip:` on a line of its own, and where to
/// read more (`fer-cam SUBCOMMAND --help`).
fn usage_message(text: &str) -> String {
    let mut first = String::new();
    let mut tips = Vec::new();
    let mut command = "fer-cam".to_string();
    let mut in_error = false;
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("error:") {
            first.push_str(rest.trim());
            in_error = true;
        } else if let Some(usage) = l.strip_prefix("Usage:") {
            // `fer-cam train all [OPTIONS] --data <DATA>` → `fer-cam train all`.
            let words: Vec<&str> = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '-', '<']))
                .collect();
            if !words.is_empty() {
                command = words.join(" ");
            }
            in_error = false;
        } else if l.starts_with("tip:") {
            tips.push(l.to_string());
        } else if l.starts_with("For more information") {
            in_error = false;
        } else if in_error && !l.is_empty() {
            // A listed item (a missing argument) or the allowed values.
            let sep = if first.ends_with(':') || l.starts_with('[') {
                " "
            } else {
                ", "
            };
            first.push_str(sep);
            first.push_str(l);
        }
    }
    let mut out = format!("error: {first} (see {command} --help)");
    for t in tips {
        out.push_str("\n  ");
        out.push_str(&t);
    }
    out
}

/// candle sizes every CPU matmul by the physical core count, which it re-reads from
/// /proc/cpuinfo on each call unless RAYON_NUM_THREADS is set (about 40 reads per daemon frame).
/// Decide both counts once, before any thread starts: rayon's pool keeps its default (logical
/// CPUs) and candle gets the physical count it would have computed.
fn fix_thread_counts() {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(v) = std::env::var_os("RAYON_NUM_THREADS") {
        // A count of the user's is kept when it is sane; 100000 threads on 2 cores would make
        // every pool hand-off crawl.
        let n = v.to_str().and_then(|s| s.trim().parse::<usize>().ok());
        if n.is_some_and(|n| (1..=(8 * logical).max(64)).contains(&n)) {
            return;
        }
        fer_cam::log!(
            "warning: RAYON_NUM_THREADS={} ignored (a count from 1 to {}); using {logical}",
            fer_cam::log::escape(&v.to_string_lossy()),
            (8 * logical).max(64)
        );
        std::env::remove_var("RAYON_NUM_THREADS");
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(logical)
        .build_global();
    std::env::set_var(
        "RAYON_NUM_THREADS",
        num_cpus::get_physical().max(1).to_string(),
    );
}

#[cfg(test)]
mod tests {
    use super::usage_message;

    #[test]
    fn usage_errors_name_what_is_missing_and_keep_the_tips() {
        let missing = "error: the following required arguments were not provided:\n  \
             --data <DATA>\n  --run-dir <RUN_DIR>\n\nUsage: fer-cam train all --data <DATA> \
             --run-dir <RUN_DIR>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_message(missing),
            "error: the following required arguments were not provided: --data <DATA>, \
             --run-dir <RUN_DIR> (see fer-cam train all --help)"
        );
        let typo = "error: unexpected argument '--inptu' found\n\n  tip: a similar argument \
             exists: '--input'\n\nUsage: fer-cam run --input <INPUT>...\n\nFor more \
             information, try '--help'.\n";
        assert_eq!(
            usage_message(typo),
            "error: unexpected argument '--inptu' found (see fer-cam run --help)\n  \
             tip: a similar argument exists: '--input'"
        );
    }
}
