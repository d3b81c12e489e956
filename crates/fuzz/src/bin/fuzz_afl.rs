//! `fuzz-afl <target>`: runs one input from stdin through a target, for
//! AFL++ (`make fuzz`, see `scripts/fuzz.sh`). A failed assertion aborts
//! the process, which AFL++ records as a crash.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: fuzz-afl <target> < input");
        return ExitCode::from(2);
    };
    let Some(target) = fuzz_targets::target(&name) else {
        let names: Vec<&str> = fuzz_targets::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "fuzz-afl: no target {name:?}; targets: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("fuzz-afl: stdin: {e}");
        return ExitCode::from(2);
    }
    // A panic must be a crash AFL++ sees, not an exit code.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
        std::process::abort();
    }));
    target(&input);
    ExitCode::SUCCESS
}
