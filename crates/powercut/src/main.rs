//! `powercut BACKING MOUNTPOINT`: mounts the power-cut simulator and takes commands on
//! standard input (see the library's documentation for the commands and the semantics).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use powercut::{Keep, Powercut};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, backing, mountpoint] = args.as_slice() else {
        eprintln!(
            "usage: powercut BACKING MOUNTPOINT   (then commands on stdin: status, cut, cut-prefix SEED, cut-all, restart, quit)"
        );
        return ExitCode::from(2);
    };
    let mut pc = match Powercut::mount(&PathBuf::from(backing), &PathBuf::from(mountpoint)) {
        Ok(pc) => pc,
        Err(e) => {
            eprintln!("powercut: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("mounted {backing} at {mountpoint}");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            [] => continue,
            ["status"] => Ok(format!("{:?}", pc.stats())),
            ["cut"] => pc.cut(Keep::Nothing).map(|r| r.to_string()),
            ["cut-all"] => pc.cut(Keep::Everything).map(|r| r.to_string()),
            ["cut-prefix", seed] => match seed.parse() {
                Ok(seed) => pc.cut(Keep::RandomPrefix { seed }).map(|r| r.to_string()),
                Err(_) => Ok(format!("error: not a seed: {seed}")),
            },
            ["restart"] => pc.restart().map(|()| "restarted".to_owned()),
            ["quit"] => break,
            other => Ok(format!("error: unknown command {other:?}")),
        };
        match answer {
            Ok(a) => println!("{a}"),
            Err(e) => println!("error: {e}"),
        }
    }
    drop(pc);
    ExitCode::SUCCESS
}
