//! The command-line tools' shared clap handling: parsing with the tools' exit codes, and
//! shell completions and man pages for the three binaries (clap_complete, clap_mangen) from
//! the same clap definitions that parse their arguments.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Parses the process's arguments as `P`; on a usage error prints clap's message and returns
/// the exit code the client tools use (0 for `--help`/`--version`, 1 for bad usage).
pub fn parse_args<P: clap::Parser>() -> Result<P, std::process::ExitCode> {
    P::try_parse().map_err(|e| {
        let _ = e.print();
        match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                std::process::ExitCode::SUCCESS
            }
            _ => std::process::ExitCode::from(1),
        }
    })
}

/// Writes the completion script of `cmd` for `shell` to `out`. (Made in memory first:
/// clap_complete panics on a failed write, e.g. to a closed pipe.)
pub fn completions(
    mut cmd: clap::Command,
    shell: Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// Writes the man page of `cmd` and one per subcommand (`strongroom-admin-pki-init-ca.1`)
/// into `dir`, creating it; returns the files written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(&path, buf)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
