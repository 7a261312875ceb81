//! The FUSE side: translates the kernel's requests into [`Model`] calls, and refuses every
//! request with `EIO` once the power is cut.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Ino, Kind, Model};

/// How long the kernel may cache attributes and entries. Every change goes through this
/// filesystem, so the kernel's copy never goes stale behind its back.
const TTL: Duration = Duration::from_secs(1);

/// An open backing file.
#[derive(Debug)]
struct Handle {
    ino: Ino,
    file: File,
    append: bool,
}

/// The state shared by the FUSE session and the [`crate::Powercut`] handle.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) model: Model,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Set by the power cut: every request fails from then on.
    pub(crate) cut: bool,
}

impl State {
    pub(crate) fn new(model: Model) -> Self {
        Self {
            model,
            handles: HashMap::new(),
            next_fh: 1,
            cut: false,
        }
    }

    fn add_handle(&mut self, ino: Ino, file: File, append: bool) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, file, append });
        fh
    }

    fn attr(&self, ino: Ino, fh: Option<u64>) -> io::Result<FileAttr> {
        let kind = self.model.kind(ino)?;
        let meta = match fh.and_then(|fh| self.handles.get(&fh)) {
            Some(h) => h.file.metadata()?,
            None => match self.model.path(ino) {
                Some(p) => std::fs::symlink_metadata(p)?,
                None => self
                    .handles
                    .values()
                    .find(|h| h.ino == ino)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
                    .file
                    .metadata()?,
            },
        };
        Ok(to_attr(ino, kind, &meta))
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn to_attr(ino: Ino, kind: Kind, m: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: match kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
        },
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The filesystem the FUSE session serves.
#[derive(Debug)]
pub(crate) struct PowercutFs {
    pub(crate) state: Arc<Mutex<State>>,
}

impl PowercutFs {
    /// The state, unless the power is cut.
    fn live(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let st = self.state.lock().map_err(|_| Errno::EIO)?;
        if st.cut {
            return Err(Errno::EIO);
        }
        Ok(st)
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.live().and_then(|st| {
            let ino = st.model.lookup(parent.0, name).map_err(errno)?;
            st.attr(ino, None).map_err(errno)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .live()
            .and_then(|st| st.attr(ino.0, fh.map(|f| f.0)).map_err(errno))
        {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.live().and_then(|mut st| {
            let st = &mut *st;
            if let Some(mode) = mode {
                st.model.set_mode(ino.0, mode).map_err(errno)?;
            }
            if let Some(len) = size {
                let file = fh.and_then(|f| st.handles.get(&f.0)).map(|h| &h.file);
                st.model.set_len(ino.0, file, len).map_err(errno)?;
            }
            st.attr(ino.0, fh.map(|f| f.0)).map_err(errno)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.live().and_then(|mut st| {
            let (ino, _) = st
                .model
                .create(parent.0, name, Kind::Dir, mode & !umask)
                .map_err(errno)?;
            st.attr(ino, None).map_err(errno)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .live()
            .and_then(|mut st| st.model.remove(parent.0, name, false).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .live()
            .and_then(|mut st| st.model.remove(parent.0, name, true).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.live().and_then(|mut st| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
            st.model
                .rename(parent.0, name, newparent.0, newname, no_replace)
                .map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.live().and_then(|mut st| {
            if st.model.kind(ino.0).map_err(errno)? != Kind::File {
                return Err(Errno::EISDIR);
            }
            let path = st.model.path(ino.0).ok_or(Errno::ENOENT)?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(errno)?;
            if flags.0 & libc::O_TRUNC != 0 {
                st.model.set_len(ino.0, Some(&file), 0).map_err(errno)?;
            }
            let append = flags.0 & libc::O_APPEND != 0;
            Ok(st.add_handle(ino.0, file, append))
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.live().and_then(|st| {
            let h = st.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match h.file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.live().and_then(|mut st| {
            let st = &mut *st;
            let h = st.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            // An append goes to the end as the backing file has it.
            let off = if h.append {
                h.file.metadata().map_err(errno)?.len()
            } else {
                offset
            };
            st.model.write(ino.0, &h.file, off, data).map_err(errno)
        });
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() syncs nothing.
        match self.live() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(mut st) = self.state.lock() {
            st.handles.remove(&fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self
            .live()
            .and_then(|mut st| st.model.fsync_file(ino.0).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self
            .live()
            .and_then(|st| st.model.kind(ino.0).map_err(errno))
        {
            Ok(Kind::Dir) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(Kind::File) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.live().and_then(|st| {
            let mut all = vec![
                (".".into(), ino.0, Kind::Dir),
                ("..".into(), st.model.parent(ino.0), Kind::Dir),
            ];
            all.extend(st.model.entries(ino.0).map_err(errno)?);
            Ok(all)
        });
        match r {
            Ok(all) => {
                for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
                    let kind = match kind {
                        Kind::File => FileType::RegularFile,
                        Kind::Dir => FileType::Directory,
                    };
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self
            .live()
            .and_then(|mut st| st.model.fsync_dir(ino.0).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.live() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.live().and_then(|mut st| {
            let (ino, file) = st
                .model
                .create(parent.0, name, Kind::File, mode & !umask)
                .map_err(errno)?;
            let file = file.ok_or(Errno::EIO)?;
            let attr = st.attr(ino, None).map_err(errno)?;
            let fh = st.add_handle(ino, file, flags & libc::O_APPEND != 0);
            Ok((attr, fh))
        });
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Not simulated: callers fall back to writing (posix_fallocate does).
        reply.error(Errno::EOPNOTSUPP);
    }
}
