//! File operations the root agent does in directories that less-privileged
//! users may write (the IM's data tree is uid 888's). Paths are resolved one
//! component at a time through directory handles; a symlink is followed only
//! when it sits in a directory that only root can write, and ownership and
//! modes are changed through handles, never by path. So a process in the IM
//! container cannot plant a link that makes the agent chown, read or write
//! something outside the tree.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, unlinkat};

/// Symlinks followed while resolving one path, as the kernel's own limit.
const MAX_LINKS: usize = 40;
/// Largest file read back (config files and secrets are tiny).
const MAX_READ: u64 = 1024 * 1024;
/// Permission bits the agent ever sets: no setuid, no setgid.
pub const MODE_MASK: u32 = 0o1777;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: must be an absolute path without `..`")]
    NotAbsolute { path: String },
    #[error(
        "{path}: refusing to follow the symlink {link}, which lies in a directory a non-root user can write"
    )]
    UnsafeSymlink { path: String, link: String },
    #[error("{path}: too many levels of symbolic links or directories")]
    TooManyLinks { path: String },
    #[error("{path}: {what} is not a directory")]
    NotADirectory { path: String, what: String },
    #[error("{path} does not exist")]
    Missing { path: String },
    #[error("{path}: not a regular file with a single name")]
    NotAFile { path: String },
    #[error("{path}: larger than {MAX_READ} bytes")]
    TooLarge { path: String },
    #[error("{what} {path}: {errno}")]
    Sys {
        what: &'static str,
        path: String,
        errno: Errno,
    },
}

fn sys(what: &'static str, path: &Path) -> impl FnOnce(Errno) -> FsError {
    let path = path.display().to_string();
    move |errno| FsError::Sys { what, path, errno }
}

/// Owner and group of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn is_kind(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

/// Only root can add, remove or replace entries in this directory.
fn root_only(stat: &FileStat) -> bool {
    stat.st_uid == 0 && stat.st_mode & 0o022 == 0
}

fn open_root() -> Result<OwnedFd, FsError> {
    nix::fcntl::open("/", dir_flags(), Mode::empty()).map_err(sys("open", Path::new("/")))
}

/// The normal components of an absolute path; `None` if it is relative or
/// climbs with `..` (callers give canonical paths).
fn components(path: &Path) -> Option<VecDeque<OsString>> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = VecDeque::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push_back(n.to_owned()),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Opens the directory `path`, creating missing components (root:root 0755,
/// as `mkdir -p`) when `create` is set.
pub fn open_dir(path: &Path, create: bool) -> Result<OwnedFd, FsError> {
    let shown = || path.display().to_string();
    let mut queue = components(path).ok_or_else(|| FsError::NotAbsolute { path: shown() })?;
    // A stack of open directories, so `..` inside a trusted link's target
    // climbs back through handles rather than by name.
    let mut stack = vec![open_root()?];
    let mut links = 0;
    let mut walked = PathBuf::from("/");
    while let Some(name) = queue.pop_front() {
        if name == OsStr::new(".") {
            continue;
        }
        if name == OsStr::new("..") {
            if stack.len() > 1 {
                stack.pop();
                walked.pop();
            }
            continue;
        }
        let parent = stack.last().expect("the root stays on the stack");
        let here = walked.join(&name);
        let stat = match fstatat(parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) if create => {
                match mkdirat(parent, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(sys("mkdir", &here)(e)),
                }
                // Look again: whatever is there now is judged like anything else.
                queue.push_front(name);
                continue;
            }
            Err(Errno::ENOENT) => return Err(FsError::Missing { path: shown() }),
            Err(e) => return Err(sys("stat", &here)(e)),
        };
        if is_kind(&stat, SFlag::S_IFLNK) {
            let parent_stat = fstat(parent).map_err(sys("stat", &walked))?;
            if !root_only(&parent_stat) {
                return Err(FsError::UnsafeSymlink {
                    path: shown(),
                    link: here.display().to_string(),
                });
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(FsError::TooManyLinks { path: shown() });
            }
            let target = readlinkat(parent, name.as_os_str()).map_err(sys("readlink", &here))?;
            let target = PathBuf::from(target);
            if target.is_absolute() {
                stack.truncate(1);
                walked = PathBuf::from("/");
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(n) => queue.push_front(n.to_owned()),
                    Component::ParentDir => queue.push_front(OsString::from("..")),
                    _ => {}
                }
            }
            continue;
        }
        if !is_kind(&stat, SFlag::S_IFDIR) {
            return Err(FsError::NotADirectory {
                path: shown(),
                what: here.display().to_string(),
            });
        }
        let fd = openat(parent, name.as_os_str(), dir_flags(), Mode::empty())
            .map_err(sys("open", &here))?;
        stack.push(fd);
        walked = here;
    }
    Ok(stack.pop().expect("the root stays on the stack"))
}

/// Sets owner and (when given) mode of an open entry.
pub fn set_owner_and_mode(
    fd: impl AsFd,
    owner: Ownership,
    mode: Option<u32>,
    path: &Path,
) -> Result<(), FsError> {
    fchown(
        fd.as_fd(),
        Some(Uid::from_raw(owner.uid)),
        Some(Gid::from_raw(owner.gid)),
    )
    .map_err(sys("chown", path))?;
    if let Some(mode) = mode {
        fchmod(fd.as_fd(), Mode::from_bits_truncate(mode & MODE_MASK))
            .map_err(sys("chmod", path))?;
    }
    Ok(())
}

/// Deepest directory level `own_tree` descends to.
const MAX_TREE_DEPTH: usize = 64;

/// Gives every entry below `dir` (not crossing into other filesystems) the
/// owner `owner`; symlinks themselves are re-owned, never followed. Returns
/// how many entries were changed. Depth-first, opening a subdirectory only
/// when it is walked: at most one handle per level is open, however wide the
/// tree (a service user could make it as wide as it likes).
pub fn own_tree(dir: OwnedFd, owner: Ownership, path: &Path) -> Result<u64, FsError> {
    let device = fstat(&dir).map_err(sys("stat", path))?.st_dev;
    own_below(&dir, owner, path, device, 0)
}

fn own_below(
    fd: &OwnedFd,
    owner: Ownership,
    here: &Path,
    device: u64,
    depth: usize,
) -> Result<u64, FsError> {
    if depth > MAX_TREE_DEPTH {
        return Err(FsError::TooManyLinks {
            path: here.display().to_string(),
        });
    }
    let listing = openat(fd, ".", dir_flags(), Mode::empty()).map_err(sys("open", here))?;
    let mut entries = nix::dir::Dir::from_fd(listing).map_err(sys("list", here))?;
    let names: Vec<OsString> = entries
        .iter()
        .filter_map(Result::ok)
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    drop(entries);
    let mut changed = 0;
    for name in names {
        let child = here.join(&name);
        let stat = match fstatat(fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            // Removed meanwhile by the service: nothing to repair.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(sys("stat", &child)(e)),
        };
        // A hard link to a file elsewhere (e.g. one of root's) is left alone.
        let foreign_link = !is_kind(&stat, SFlag::S_IFDIR) && stat.st_nlink > 1;
        if (stat.st_uid, stat.st_gid) != (owner.uid, owner.gid) && !foreign_link {
            fchownat(
                fd,
                name.as_os_str(),
                Some(Uid::from_raw(owner.uid)),
                Some(Gid::from_raw(owner.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(sys("chown", &child))?;
            changed += 1;
        }
        if is_kind(&stat, SFlag::S_IFDIR) && stat.st_dev == device {
            match openat(fd, name.as_os_str(), dir_flags(), Mode::empty()) {
                Ok(sub) => changed += own_below(&sub, owner, &child, device, depth + 1)?,
                // Replaced by a link or removed since the stat: not followed.
                Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => {}
                Err(e) => return Err(sys("open", &child)(e)),
            }
        }
    }
    Ok(changed)
}

/// Splits a file path into its directory and final name.
fn split(path: &Path) -> Result<(&Path, &OsStr), FsError> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(FsError::NotAbsolute {
            path: path.display().to_string(),
        }),
    }
}

/// Reads a regular file without following a symlink at its last component;
/// `Ok(None)` when it does not exist.
pub fn read_file(path: &Path) -> Result<Option<String>, FsError> {
    let (dir, name) = split(path)?;
    let dir = match open_dir(dir, false) {
        Ok(fd) => fd,
        Err(FsError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    read_file_in(&dir, name, path)
}

/// Whether `path` exists (as anything, a link included), resolving its
/// directory under the symlink rule of [`open_dir`].
pub fn exists(path: &Path) -> Result<bool, FsError> {
    let (dir, name) = split(path)?;
    let dir = match open_dir(dir, false) {
        Ok(fd) => fd,
        Err(FsError::Missing { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(sys("stat", path)(e)),
    }
}

/// Whether only root can change the directory holding `path` and the way
/// to it: the directory itself root-owned and writable by root alone, every
/// ancestor too or sticky (as `/tmp`: others cannot move root's entries).
pub fn in_root_only_dir(path: &Path) -> Result<bool, FsError> {
    let (dir, _) = split(path)?;
    let stat = |p: &Path| -> Result<FileStat, FsError> {
        fstat(&open_dir(p, false)?).map_err(sys("stat", p))
    };
    if !root_only(&stat(dir)?) {
        return Ok(false);
    }
    for ancestor in dir.ancestors().skip(1) {
        let s = stat(ancestor)?;
        if !(root_only(&s) || (s.st_uid == 0 && s.st_mode & 0o1000 != 0)) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn read_file_in(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<Option<String>, FsError> {
    let fd = match openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => {
            return Err(FsError::NotAFile {
                path: path.display().to_string(),
            });
        }
        Err(e) => return Err(sys("open", path)(e)),
    };
    let stat = fstat(&fd).map_err(sys("stat", path))?;
    // A second name may be a hard link someone made to a file they cannot
    // read: only a file with one name is read.
    if !is_kind(&stat, SFlag::S_IFREG) || stat.st_nlink > 1 {
        return Err(FsError::NotAFile {
            path: path.display().to_string(),
        });
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_READ + 1)
        .read_to_string(&mut text)
        .map_err(|e| sys("read", path)(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    if text.len() as u64 > MAX_READ {
        return Err(FsError::TooLarge {
            path: path.display().to_string(),
        });
    }
    Ok(Some(text))
}

/// Replaces the file at `path` atomically: a fresh temporary file in the same
/// directory gets owner and mode through its handle, the contents, an fsync,
/// then is renamed over the old name (which, if a link, is replaced, not
/// followed). The directory must exist.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    owner: Ownership,
    mode: u32,
) -> Result<(), FsError> {
    let (dir_path, name) = split(path)?;
    let dir = open_dir(dir_path, false)?;
    let suffix = super::secrets::generate(16).map_err(|e| {
        sys("random name for", path)(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    })?;
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".imfleet-{suffix}"));
    let temp = temp.as_os_str();
    let fd = openat(
        &dir,
        temp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(sys("create", path))?;
    let result = (|| {
        set_owner_and_mode(&fd, owner, Some(mode), path)?;
        let mut file = std::fs::File::from(fd);
        let io =
            |e: std::io::Error| sys("write", path)(Errno::from_raw(e.raw_os_error().unwrap_or(0)));
        file.write_all(contents).map_err(io)?;
        file.sync_all().map_err(io)?;
        renameat(&dir, temp, &dir, name).map_err(sys("rename", path))
    })();
    if result.is_err() {
        let _ = unlinkat(&dir, temp, UnlinkatFlags::NoRemoveDir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn creates_missing_directories_and_refuses_relative_or_climbing_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        open_dir(&deep, true).unwrap();
        assert!(deep.is_dir());
        assert!(matches!(
            open_dir(Path::new("relative/x"), true),
            Err(FsError::NotAbsolute { .. })
        ));
        assert!(matches!(
            open_dir(&tmp.path().join("a/../b"), true),
            Err(FsError::NotAbsolute { .. })
        ));
        assert!(matches!(
            open_dir(&tmp.path().join("absent"), false),
            Err(FsError::Missing { .. })
        ));
    }

    #[test]
    fn follows_links_only_in_root_only_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let trusted = tmp.path().join("trusted");
        let target = tmp.path().join("target");
        std::fs::create_dir_all(&trusted).unwrap();
        std::fs::create_dir_all(target.join("inner")).unwrap();
        chmod(&trusted, 0o755);
        symlink("../target", trusted.join("link")).unwrap();
        // A link root placed in a directory only root writes is followed,
        // `..` in its target included.
        open_dir(&trusted.join("link/inner"), false).unwrap();

        // The same link in a directory others can write is refused.
        let shared = tmp.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        chmod(&shared, 0o777);
        symlink(&target, shared.join("link")).unwrap();
        let err = open_dir(&shared.join("link/inner"), true).unwrap_err();
        assert!(matches!(err, FsError::UnsafeSymlink { .. }), "{err}");
        assert!(err.to_string().contains("non-root user can write"));

        // A directory owned by a service user counts as writable by others.
        let owned = tmp.path().join("owned");
        std::fs::create_dir_all(&owned).unwrap();
        std::os::unix::fs::chown(&owned, Some(888), Some(888)).unwrap();
        chmod(&owned, 0o755);
        symlink("/etc", owned.join("im")).unwrap();
        assert!(matches!(
            open_dir(&owned.join("im"), true),
            Err(FsError::UnsafeSymlink { .. })
        ));
        assert_eq!(std::fs::metadata("/etc").unwrap().uid(), 0, "untouched");
    }

    #[test]
    fn own_tree_repairs_drift_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("im-data");
        std::fs::create_dir_all(tree.join("im/logs")).unwrap();
        std::fs::write(tree.join("im/logs/a.log"), "x").unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "root's").unwrap();
        symlink(&outside, tree.join("im/escape")).unwrap();
        let fd = open_dir(&tree, false).unwrap();
        let owner = Ownership { uid: 888, gid: 888 };
        let changed = own_tree(fd, owner, &tree).unwrap();
        assert_eq!(changed, 4, "im, logs, a.log and the link itself");
        for p in ["im", "im/logs", "im/logs/a.log"] {
            let m = std::fs::metadata(tree.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (888, 888), "{p}");
        }
        assert_eq!(
            std::fs::metadata(&outside).unwrap().uid(),
            0,
            "not followed"
        );
        assert_eq!(
            std::fs::symlink_metadata(tree.join("im/escape"))
                .unwrap()
                .uid(),
            888
        );
        // Nothing left to repair the second time.
        let fd = open_dir(&tree, false).unwrap();
        assert_eq!(own_tree(fd, owner, &tree).unwrap(), 0);
    }

    #[test]
    fn write_file_replaces_a_planted_link_instead_of_following_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("im-data");
        std::fs::create_dir_all(&dir).unwrap();
        let precious = tmp.path().join("precious");
        std::fs::write(&precious, "root only").unwrap();
        chmod(&precious, 0o600);
        symlink(&precious, dir.join("system.ini")).unwrap();

        let owner = Ownership { uid: 888, gid: 888 };
        write_file(&dir.join("system.ini"), b"[database]\n", owner, 0o4755).unwrap();
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root only");
        let m = std::fs::symlink_metadata(dir.join("system.ini")).unwrap();
        assert!(m.is_file());
        assert_eq!((m.uid(), m.mode() & 0o7777), (888, 0o755), "setuid masked");
        assert_eq!(std::fs::metadata(&precious).unwrap().uid(), 0);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn read_file_refuses_links_and_special_files() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("plain"), "v").unwrap();
        symlink(tmp.path().join("plain"), tmp.path().join("link")).unwrap();
        assert_eq!(
            read_file(&tmp.path().join("plain")).unwrap().as_deref(),
            Some("v")
        );
        assert!(read_file(&tmp.path().join("absent")).unwrap().is_none());
        assert!(matches!(
            read_file(&tmp.path().join("link")),
            Err(FsError::NotAFile { .. })
        ));
        assert!(matches!(
            read_file(Path::new("/dev/null")),
            Err(FsError::NotAFile { .. })
        ));
    }
}
