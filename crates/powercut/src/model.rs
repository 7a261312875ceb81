//! The model behind the filesystem: the live tree (what processes see, kept in the backing
//! directory), the durable state (what a power cut leaves), and the ordered journal of the
//! operations made since they were last made durable.
//!
//! Everything here runs without FUSE, so the durability rules are unit-tested on their own;
//! [`crate::fs`] only translates FUSE requests into these calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// An inode number of the simulated filesystem (not the backing filesystem's).
pub type Ino = u64;
/// The root directory's inode number (FUSE's).
pub const ROOT: Ino = 1;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    /// Where the node is in the live tree (parent, name); `None` once unlinked.
    live: Option<(Ino, OsString)>,
    /// Live entries (directories).
    children: BTreeMap<OsString, Ino>,
    /// Durable entries (directories).
    durable_children: BTreeMap<OsString, Ino>,
    /// Durable contents (files). `None`: unchanged since the mount, so the backing file
    /// holds it; loaded before the first change that would lose it.
    durable: Option<Vec<u8>>,
    mode: u32,
}

impl Node {
    fn new(kind: Kind, live: Option<(Ino, OsString)>, mode: u32, durable: Option<Vec<u8>>) -> Self {
        Self {
            kind,
            live,
            children: BTreeMap::new(),
            durable_children: BTreeMap::new(),
            durable,
            mode,
        }
    }
}

/// One operation not yet durable, in the order it was made.
#[derive(Debug, Clone)]
enum Op {
    Write {
        ino: Ino,
        off: u64,
        data: Vec<u8>,
    },
    SetLen {
        ino: Ino,
        len: u64,
    },
    Link {
        dir: Ino,
        name: OsString,
        ino: Ino,
    },
    Unlink {
        dir: Ino,
        name: OsString,
        ino: Ino,
    },
    Rename {
        from: Ino,
        from_name: OsString,
        to: Ino,
        to_name: OsString,
        ino: Ino,
    },
}

impl Op {
    /// The file whose fsync makes this durable (data and size operations).
    fn data_ino(&self) -> Option<Ino> {
        match self {
            Op::Write { ino, .. } | Op::SetLen { ino, .. } => Some(*ino),
            _ => None,
        }
    }

    /// Whether the fsync of directory `d` makes this durable (entry operations in `d`).
    fn in_dir(&self, d: Ino) -> bool {
        match self {
            Op::Link { dir, .. } | Op::Unlink { dir, .. } => *dir == d,
            Op::Rename { from, to, .. } => *from == d || *to == d,
            _ => false,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// What a power cut keeps of the operations not yet made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: exactly what was synced survives.
    Nothing,
    /// A prefix of the unsynced operations, of a length drawn uniformly from
    /// `0..=pending` with this seed (as a device that writes back in order would).
    RandomPrefix {
        /// The seed (reported back, so a failure reproduces).
        seed: u64,
    },
    /// Everything (what `kill -9` alone leaves): a control for tests.
    Everything,
}

/// What a power cut dropped and kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// What was asked.
    pub keep: Keep,
    /// Operations not yet durable at the cut.
    pub pending_ops: usize,
    /// Bytes those operations wrote.
    pub pending_bytes: u64,
    /// Operations kept (the length of the prefix).
    pub kept_ops: usize,
    /// Bytes the kept operations wrote.
    pub kept_bytes: u64,
}

impl std::fmt::Display for CutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "power cut ({:?}): {} of {} unsynced operations kept ({} of {} bytes written)",
            self.keep, self.kept_ops, self.pending_ops, self.kept_bytes, self.pending_bytes
        )
    }
}

/// Counters since the mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Operations not yet durable.
    pub pending_ops: usize,
    /// fsync/fdatasync calls on files.
    pub file_syncs: u64,
    /// fsync calls on directories.
    pub dir_syncs: u64,
}

/// The live tree, the durable state and the journal between them.
#[derive(Debug)]
pub struct Model {
    backing: PathBuf,
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    journal: Vec<Op>,
    file_syncs: u64,
    dir_syncs: u64,
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

impl Model {
    /// The model of `backing` as it is now, all of it durable.
    pub fn scan(backing: &Path) -> io::Result<Self> {
        let mode = fs::metadata(backing)?.mode();
        let mut model = Self {
            backing: backing.to_path_buf(),
            nodes: HashMap::from([(ROOT, Node::new(Kind::Dir, None, mode, None))]),
            next_ino: ROOT + 1,
            journal: Vec::new(),
            file_syncs: 0,
            dir_syncs: 0,
        };
        let mut stack = vec![(ROOT, backing.to_path_buf())];
        while let Some((dir, path)) = stack.pop() {
            for entry in fs::read_dir(&path)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                let kind = if meta.is_dir() {
                    Kind::Dir
                } else if meta.is_file() {
                    Kind::File
                } else {
                    // Symlinks and special files are not simulated (and not shown).
                    continue;
                };
                let name = entry.file_name();
                let ino = model.alloc(Node::new(
                    kind,
                    Some((dir, name.clone())),
                    meta.mode(),
                    None,
                ));
                let parent = model.node_mut(dir)?;
                parent.children.insert(name.clone(), ino);
                parent.durable_children.insert(name, ino);
                if kind == Kind::Dir {
                    stack.push((ino, entry.path()));
                }
            }
        }
        Ok(model)
    }

    fn alloc(&mut self, node: Node) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        ino
    }

    fn node(&self, ino: Ino) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or_else(enoent)
    }

    fn node_mut(&mut self, ino: Ino) -> io::Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or_else(enoent)
    }

    /// The backing directory.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The kind of `ino`.
    pub fn kind(&self, ino: Ino) -> io::Result<Kind> {
        Ok(self.node(ino)?.kind)
    }

    /// The live path of `ino` in the backing directory (`None` once unlinked).
    pub fn path(&self, ino: Ino) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut at = ino;
        // A live tree has no cycles; the bound only guards against a bug looping forever.
        for _ in 0..4096 {
            if at == ROOT {
                let mut p = self.backing.clone();
                p.extend(parts.iter().rev());
                return Some(p);
            }
            let (parent, name) = self.nodes.get(&at)?.live.as_ref()?;
            parts.push(name.clone());
            at = *parent;
        }
        None
    }

    /// The live entry `name` of directory `dir`.
    pub fn lookup(&self, dir: Ino, name: &OsStr) -> io::Result<Ino> {
        self.node(dir)?
            .children
            .get(name)
            .copied()
            .ok_or_else(enoent)
    }

    /// The live entries of `dir`, in name order.
    pub fn entries(&self, dir: Ino) -> io::Result<Vec<(OsString, Ino, Kind)>> {
        let node = self.node(dir)?;
        Ok(node
            .children
            .iter()
            .filter_map(|(n, i)| self.nodes.get(i).map(|c| (n.clone(), *i, c.kind)))
            .collect())
    }

    /// The parent of `ino` in the live tree (the root is its own parent).
    pub fn parent(&self, ino: Ino) -> Ino {
        self.nodes
            .get(&ino)
            .and_then(|n| n.live.as_ref())
            .map_or(ROOT, |(p, _)| *p)
    }

    /// Loads the durable contents of a file unchanged since the mount, before a change
    /// that would lose it.
    fn snapshot(&mut self, ino: Ino) -> io::Result<()> {
        let node = self.node(ino)?;
        if node.kind != Kind::File || node.durable.is_some() {
            return Ok(());
        }
        let path = self.path(ino).ok_or_else(enoent)?;
        let data = fs::read(path)?;
        self.node_mut(ino)?.durable = Some(data);
        Ok(())
    }

    /// Creates `name` in `dir` (a file or a directory) in the backing directory too;
    /// returns the new node and, for a file, the backing file opened read-write.
    pub fn create(
        &mut self,
        dir: Ino,
        name: &OsStr,
        kind: Kind,
        mode: u32,
    ) -> io::Result<(Ino, Option<File>)> {
        if self.node(dir)?.kind != Kind::Dir {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        if self.node(dir)?.children.contains_key(name) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let path = self.path(dir).ok_or_else(enoent)?.join(name);
        let file = match kind {
            Kind::File => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o7777)
                    .open(&path)?;
                Some(f)
            }
            Kind::Dir => {
                use std::os::unix::fs::DirBuilderExt;
                fs::DirBuilder::new().mode(mode & 0o7777).create(&path)?;
                None
            }
        };
        let mode = fs::metadata(&path)?.mode();
        // A new file's durable contents are empty until its first fsync.
        let durable = (kind == Kind::File).then(Vec::new);
        let ino = self.alloc(Node::new(kind, Some((dir, name.to_owned())), mode, durable));
        self.node_mut(dir)?.children.insert(name.to_owned(), ino);
        self.journal.push(Op::Link {
            dir,
            name: name.to_owned(),
            ino,
        });
        Ok((ino, file))
    }

    /// Removes `name` from `dir` (`rmdir` when `dir_wanted`).
    pub fn remove(&mut self, dir: Ino, name: &OsStr, dir_wanted: bool) -> io::Result<()> {
        let ino = self.lookup(dir, name)?;
        let kind = self.kind(ino)?;
        match (kind, dir_wanted) {
            (Kind::Dir, false) => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
            (Kind::File, true) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            _ => {}
        }
        let path = self.path(ino).ok_or_else(enoent)?;
        self.snapshot(ino)?;
        match kind {
            Kind::Dir => fs::remove_dir(&path)?,
            Kind::File => fs::remove_file(&path)?,
        }
        self.node_mut(dir)?.children.remove(name);
        self.node_mut(ino)?.live = None;
        self.journal.push(Op::Unlink {
            dir,
            name: name.to_owned(),
            ino,
        });
        Ok(())
    }

    /// Renames `from/from_name` to `to/to_name`, replacing what was there.
    pub fn rename(
        &mut self,
        from: Ino,
        from_name: &OsStr,
        to: Ino,
        to_name: &OsStr,
        no_replace: bool,
    ) -> io::Result<()> {
        let ino = self.lookup(from, from_name)?;
        let replaced = self.node(to)?.children.get(to_name).copied();
        if replaced == Some(ino) {
            return Ok(());
        }
        if replaced.is_some() && no_replace {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        if self.node(to)?.kind != Kind::Dir {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let old_path = self.path(ino).ok_or_else(enoent)?;
        let new_path = self.path(to).ok_or_else(enoent)?.join(to_name);
        if let Some(r) = replaced {
            self.snapshot(r)?;
        }
        fs::rename(&old_path, &new_path)?;
        self.node_mut(from)?.children.remove(from_name);
        self.node_mut(to)?.children.insert(to_name.to_owned(), ino);
        self.node_mut(ino)?.live = Some((to, to_name.to_owned()));
        if let Some(r) = replaced {
            self.node_mut(r)?.live = None;
        }
        self.journal.push(Op::Rename {
            from,
            from_name: from_name.to_owned(),
            to,
            to_name: to_name.to_owned(),
            ino,
        });
        Ok(())
    }

    /// Writes `data` at `off` of `ino` through `file` (its backing file).
    pub fn write(&mut self, ino: Ino, file: &File, off: u64, data: &[u8]) -> io::Result<()> {
        self.snapshot(ino)?;
        file.write_all_at(data, off)?;
        self.journal.push(Op::Write {
            ino,
            off,
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Sets the size of `ino` through `file`, or through its path when no file is open.
    pub fn set_len(&mut self, ino: Ino, file: Option<&File>, len: u64) -> io::Result<()> {
        if self.kind(ino)? != Kind::File {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        self.snapshot(ino)?;
        match file {
            Some(f) => f.set_len(len)?,
            None => {
                let path = self.path(ino).ok_or_else(enoent)?;
                fs::OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .set_len(len)?;
            }
        }
        self.journal.push(Op::SetLen { ino, len });
        Ok(())
    }

    /// Records a permission change (not journaled: modes are not what this simulates).
    pub fn set_mode(&mut self, ino: Ino, mode: u32) -> io::Result<()> {
        let path = self.path(ino).ok_or_else(enoent)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
        let node = self.node_mut(ino)?;
        node.mode = (node.mode & !0o7777) | (mode & 0o7777);
        Ok(())
    }

    /// fsync/fdatasync of a file: its data and size become durable (not its entry).
    pub fn fsync_file(&mut self, ino: Ino) -> io::Result<()> {
        self.file_syncs += 1;
        self.make_durable(|op| op.data_ino() == Some(ino))
    }

    /// fsync of a directory: the entries created, removed or renamed in it become durable
    /// (a rename is durable once either of its directories is synced).
    pub fn fsync_dir(&mut self, dir: Ino) -> io::Result<()> {
        self.dir_syncs += 1;
        self.make_durable(|op| op.in_dir(dir))
    }

    fn make_durable(&mut self, pick: impl Fn(&Op) -> bool) -> io::Result<()> {
        let journal = std::mem::take(&mut self.journal);
        let mut rest = Vec::with_capacity(journal.len());
        for op in journal {
            if pick(&op) {
                self.apply(&op)?;
            } else {
                rest.push(op);
            }
        }
        self.journal = rest;
        Ok(())
    }

    /// Applies one operation to the durable state.
    fn apply(&mut self, op: &Op) -> io::Result<()> {
        match op {
            Op::Write { ino, off, data } => {
                let node = self.node_mut(*ino)?;
                let buf = node.durable.get_or_insert_with(Vec::new);
                let (off, end) = (*off as usize, *off as usize + data.len());
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                buf[off..end].copy_from_slice(data);
            }
            Op::SetLen { ino, len } => {
                let node = self.node_mut(*ino)?;
                node.durable
                    .get_or_insert_with(Vec::new)
                    .resize(*len as usize, 0);
            }
            Op::Link { dir, name, ino } => {
                self.node_mut(*dir)?
                    .durable_children
                    .insert(name.clone(), *ino);
            }
            Op::Unlink { dir, name, ino } => {
                let d = self.node_mut(*dir)?;
                if d.durable_children.get(name) == Some(ino) {
                    d.durable_children.remove(name);
                }
            }
            Op::Rename {
                from,
                from_name,
                to,
                to_name,
                ino,
            } => {
                let f = self.node_mut(*from)?;
                if f.durable_children.get(from_name) == Some(ino) {
                    f.durable_children.remove(from_name);
                }
                self.node_mut(*to)?
                    .durable_children
                    .insert(to_name.clone(), *ino);
            }
        }
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            pending_ops: self.journal.len(),
            file_syncs: self.file_syncs,
            dir_syncs: self.dir_syncs,
        }
    }

    /// Cuts the power: keeps what `keep` says of the unsynced operations and drops the
    /// rest. Afterwards the durable state is what [`Model::rebuild`] writes out.
    pub fn cut(&mut self, keep: Keep) -> io::Result<CutReport> {
        let journal = std::mem::take(&mut self.journal);
        let kept = match keep {
            Keep::Nothing => 0,
            Keep::Everything => journal.len(),
            Keep::RandomPrefix { seed } => (splitmix64(seed) % (journal.len() as u64 + 1)) as usize,
        };
        for op in &journal[..kept] {
            self.apply(op)?;
        }
        Ok(CutReport {
            keep,
            pending_ops: journal.len(),
            pending_bytes: journal.iter().map(Op::bytes).sum(),
            kept_ops: kept,
            kept_bytes: journal[..kept].iter().map(Op::bytes).sum(),
        })
    }

    /// Replaces the backing directory's contents by the durable state (after [`Model::cut`];
    /// the filesystem must be unmounted). Builds the new tree beside it, then swaps.
    pub fn rebuild(&self) -> io::Result<()> {
        let sibling = |suffix: &str| {
            let mut s = self.backing.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        let (new, old) = (sibling(".powercut-new"), sibling(".powercut-old"));
        for p in [&new, &old] {
            if p.exists() {
                fs::remove_dir_all(p)?;
            }
        }
        fs::create_dir(&new)?;
        let mut seen = HashSet::from([ROOT]);
        let mut stack = vec![(ROOT, new.clone())];
        while let Some((dir, path)) = stack.pop() {
            for (name, ino) in &self.node(dir)?.durable_children {
                // Out-of-order directory renames could make a cycle: write each node once.
                if !seen.insert(*ino) {
                    continue;
                }
                let node = self.node(*ino)?;
                let target = path.join(name);
                match node.kind {
                    Kind::Dir => {
                        fs::create_dir(&target)?;
                        stack.push((*ino, target.clone()));
                    }
                    Kind::File => {
                        let data = match &node.durable {
                            Some(d) => d.clone(),
                            None => fs::read(self.path(*ino).ok_or_else(enoent)?)?,
                        };
                        fs::write(&target, data)?;
                    }
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(node.mode & 0o7777))?;
            }
        }
        fs::rename(&self.backing, &old)?;
        fs::rename(&new, &self.backing)?;
        fs::remove_dir_all(&old)
    }
}

/// A 64-bit mix of the seed (splitmix64's finaliser).
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let m = Model::scan(dir.path()).unwrap();
        (dir, m)
    }

    fn new_file(m: &mut Model, dir: Ino, name: &str, data: &[u8]) -> (Ino, File) {
        let (ino, f) = m.create(dir, OsStr::new(name), Kind::File, 0o600).unwrap();
        let f = f.unwrap();
        m.write(ino, &f, 0, data).unwrap();
        (ino, f)
    }

    fn after_cut(m: &mut Model, keep: Keep, path: &str) -> Option<Vec<u8>> {
        m.cut(keep).unwrap();
        m.rebuild().unwrap();
        fs::read(m.backing().join(path)).ok()
    }

    #[test]
    fn unsynced_new_file_is_gone() {
        let (_d, mut m) = model();
        new_file(&mut m, ROOT, "a", b"hello");
        m.fsync_dir(ROOT).unwrap();
        new_file(&mut m, ROOT, "b", b"hello");
        assert_eq!(after_cut(&mut m, Keep::Nothing, "b"), None);
        // The synced entry survives, but not the unsynced data behind it.
        assert_eq!(fs::read(m.backing().join("a")).unwrap(), b"");
    }

    #[test]
    fn synced_file_and_entry_survive() {
        let (_d, mut m) = model();
        new_file(&mut m, ROOT, "a", b"hello");
        m.fsync_file(m.lookup(ROOT, OsStr::new("a")).unwrap())
            .unwrap();
        m.fsync_dir(ROOT).unwrap();
        assert_eq!(after_cut(&mut m, Keep::Nothing, "a").unwrap(), b"hello");
    }

    #[test]
    fn file_fsync_alone_does_not_keep_the_entry() {
        let (_d, mut m) = model();
        let (ino, _f) = new_file(&mut m, ROOT, "a", b"hello");
        m.fsync_file(ino).unwrap();
        assert_eq!(after_cut(&mut m, Keep::Nothing, "a"), None);
    }

    #[test]
    fn unsynced_overwrite_and_truncate_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"old contents").unwrap();
        let mut m = Model::scan(dir.path()).unwrap();
        let ino = m.lookup(ROOT, OsStr::new("a")).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.path(ino).unwrap())
            .unwrap();
        m.set_len(ino, Some(&f), 0).unwrap();
        m.write(ino, &f, 0, b"new").unwrap();
        assert_eq!(fs::read(m.path(ino).unwrap()).unwrap(), b"new");
        assert_eq!(
            after_cut(&mut m, Keep::Nothing, "a").unwrap(),
            b"old contents"
        );
    }

    #[test]
    fn rename_is_durable_with_its_directory() {
        let (_d, mut m) = model();
        let (ino, _f) = new_file(&mut m, ROOT, "tmp", b"v2");
        m.fsync_file(ino).unwrap();
        m.rename(ROOT, OsStr::new("tmp"), ROOT, OsStr::new("final"), false)
            .unwrap();
        m.fsync_dir(ROOT).unwrap();
        assert_eq!(after_cut(&mut m, Keep::Nothing, "final").unwrap(), b"v2");
        assert!(!m.backing().join("tmp").exists());
    }

    #[test]
    fn unsynced_rename_over_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("final"), b"v1").unwrap();
        let mut m = Model::scan(dir.path()).unwrap();
        let (ino, _f) = new_file(&mut m, ROOT, "tmp", b"v2");
        m.fsync_file(ino).unwrap();
        m.rename(ROOT, OsStr::new("tmp"), ROOT, OsStr::new("final"), false)
            .unwrap();
        assert_eq!(fs::read(m.path(ino).unwrap()).unwrap(), b"v2");
        assert_eq!(after_cut(&mut m, Keep::Nothing, "final").unwrap(), b"v1");
        assert!(!m.backing().join("tmp").exists());
    }

    #[test]
    fn random_prefix_keeps_a_prefix() {
        let mut lens = HashSet::new();
        for seed in 0..40u64 {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("log"), b"").unwrap();
            let mut m = Model::scan(dir.path()).unwrap();
            let ino = m.lookup(ROOT, OsStr::new("log")).unwrap();
            let f = fs::OpenOptions::new()
                .write(true)
                .open(m.path(ino).unwrap())
                .unwrap();
            for i in 0..10u8 {
                m.write(ino, &f, u64::from(i), &[b'a' + i]).unwrap();
            }
            let report = m.cut(Keep::RandomPrefix { seed }).unwrap();
            m.rebuild().unwrap();
            let got = fs::read(m.backing().join("log")).unwrap();
            assert_eq!(report.pending_ops, 10);
            assert_eq!(got, &b"abcdefghij"[..report.kept_ops], "seed {seed}");
            lens.insert(report.kept_ops);
        }
        assert!(
            lens.len() > 3,
            "prefix lengths vary with the seed: {lens:?}"
        );
    }

    #[test]
    fn new_directory_needs_its_parent_synced() {
        let (_d, mut m) = model();
        let (sub, _) = m.create(ROOT, OsStr::new("d"), Kind::Dir, 0o700).unwrap();
        let (ino, _f) = new_file(&mut m, sub, "x", b"1");
        m.fsync_file(ino).unwrap();
        m.fsync_dir(sub).unwrap();
        m.cut(Keep::Nothing).unwrap();
        m.rebuild().unwrap();
        assert!(!m.backing().join("d").exists());
    }
}
