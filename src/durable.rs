//! Making files durable: fsync of files and of the directories that name them, and of a
//! SoftHSM2 token directory after the token changed.
//!
//! A file's fsync makes its data and size durable, not its name: a file (or directory)
//! created since its directory was last fsynced can vanish in a power cut. Every path here
//! that creates something fsyncs the parent afterwards.

use std::io;
use std::path::{Path, PathBuf};

/// Opens `path` (a file or a directory) read-only and fsyncs it.
pub fn fsync_path(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fsyncs the directory holding `path` (after creating `path` in it). A bare file name's
/// directory is the working directory.
pub fn fsync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsync_path(p),
        _ => fsync_path(Path::new(".")),
    }
}

/// `create_dir_all`, then fsync the parent of every directory it created.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        fsync_parent(d)?;
    }
    Ok(())
}

/// The token directory SoftHSM2 uses (`directories.tokendir` of `$SOFTHSM2_CONF`, else of
/// `/etc/softhsm/softhsm2.conf`); `None` when there is no such configuration (another
/// PKCS#11 module, whose durability is its own).
pub fn softhsm_token_dir() -> Option<PathBuf> {
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/softhsm/softhsm2.conf"));
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "directories.tokendir")
        .map(|(_, v)| PathBuf::from(v.trim()))
}

/// fsyncs every file of a SoftHSM2 token directory (`<tokendir>/<uuid>/*.object`,
/// `token.object`, locks), every token's directory and the token directory itself.
/// SoftHSM2 fsyncs none of them when it creates, changes or deletes an object, so a key
/// generated or a checkpoint written just before a power cut could otherwise vanish while
/// records or logs already depend on it. No-op without a SoftHSM2 configuration.
pub fn sync_softhsm_tokens() -> io::Result<()> {
    let Some(root) = softhsm_token_dir() else {
        return Ok(());
    };
    if !root.is_dir() {
        return Ok(());
    }
    for token in std::fs::read_dir(&root)? {
        let token = token?;
        if !token.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(token.path())? {
            let f = f?;
            if f.file_type()?.is_file() {
                match fsync_path(&f.path()) {
                    // Another process that shares the token (a replica) destroyed that
                    // object since the listing: nothing left to make durable, and the
                    // directory's fsync below covers the removal.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
        }
        fsync_path(&token.path())?;
    }
    fsync_path(&root)
}
