//! The microVM's cgroup v2: `<cgroup2 mount>/<parent>/<id>`.
//!
//! [`CgroupPlan::new`] finds the cgroup2 mount and checks that every controller the
//! `--cgroup` values need is available there before anything is created; a missing one is
//! an error (on a hybrid host the v1 hierarchies usually hold the controllers and the
//! unified one has few or none). [`CgroupPlan::apply`] creates the directories, enables
//! the controllers in each ancestor's `cgroup.subtree_control`, writes the values and
//! moves the calling process in.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::cli::CgroupValue;

const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {MOUNTINFO}: {0}")]
    Mountinfo(io::Error),
    #[error(
        "no cgroup2 file system is mounted (see {MOUNTINFO}); mount one, e.g. on /sys/fs/cgroup"
    )]
    NoCgroup2Mount,
    #[error(
        "cgroup controller {controller:?} (for {file}) is not available in the cgroup v2 \
         hierarchy at {mount} (it offers: {available}); on a hybrid host a cgroup v1 \
         hierarchy holds it"
    )]
    ControllerUnavailable {
        controller: String,
        file: String,
        mount: PathBuf,
        available: String,
    },
    #[error("cannot create cgroup {0}: {1}")]
    Create(PathBuf, io::Error),
    #[error("cannot enable controller {controller:?} in {path}: {source}")]
    Enable {
        controller: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
}

/// What the jailer will do with cgroups, decided (and checked) before the jail is built.
#[derive(Debug)]
pub struct CgroupPlan {
    mount: PathBuf,
    /// `<parent>/<id>`, relative to the mount.
    relative: PathBuf,
    values: Vec<CgroupValue>,
}

impl CgroupPlan {
    /// Finds the cgroup2 mount and checks the controllers `values` need.
    pub fn new(parent: &Path, id: &str, values: &[CgroupValue]) -> Result<Self, CgroupError> {
        let mountinfo = fs::read_to_string(MOUNTINFO).map_err(CgroupError::Mountinfo)?;
        let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2Mount)?;
        let available = controllers(&mount.join("cgroup.controllers"));
        for value in values {
            if let Some(controller) = value.controller() {
                if !available.contains(controller) {
                    let list: Vec<&str> = available.iter().map(String::as_str).collect();
                    return Err(CgroupError::ControllerUnavailable {
                        controller: controller.to_string(),
                        file: value.file.clone(),
                        mount,
                        available: if list.is_empty() {
                            "none".into()
                        } else {
                            list.join(" ")
                        },
                    });
                }
            }
        }
        Ok(CgroupPlan {
            mount,
            relative: parent.join(id),
            values: values.to_vec(),
        })
    }

    /// The microVM's cgroup directory.
    pub fn path(&self) -> PathBuf {
        self.mount.join(&self.relative)
    }

    /// Creates the cgroup, enables the controllers, writes the values and moves this
    /// process (and so everything it starts) in.
    pub fn apply(&self) -> Result<(), CgroupError> {
        let leaf = self.path();
        // Only root may add cgroups below the microVM's (the jailer runs with umask 0).
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&leaf)
            .map_err(|e| CgroupError::Create(leaf.clone(), e))?;
        let needed: BTreeSet<&str> = self.values.iter().filter_map(|v| v.controller()).collect();
        // Each controller must be enabled in the subtree_control of every ancestor of the
        // leaf, from the mount's root down to the parent cgroup.
        let mut ancestors = vec![self.mount.clone()];
        let mut dir = self.mount.clone();
        let components: Vec<_> = self.relative.components().collect();
        for component in &components[..components.len().saturating_sub(1)] {
            dir.push(component);
            ancestors.push(dir.clone());
        }
        for ancestor in &ancestors {
            let control = ancestor.join("cgroup.subtree_control");
            let enabled = controllers(&control);
            for controller in needed.iter().filter(|c| !enabled.contains(**c)) {
                fs::write(&control, format!("+{controller}")).map_err(|source| {
                    CgroupError::Enable {
                        controller: controller.to_string(),
                        path: control.clone(),
                        source,
                    }
                })?;
            }
        }
        for value in &self.values {
            write(&leaf.join(&value.file), &value.value)?;
        }
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// The controllers a `cgroup.controllers` or `cgroup.subtree_control` file lists.
fn controllers(path: &Path) -> BTreeSet<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The mount point of the first cgroup2 file system in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split(' ').next()?;
        let mount_point = before.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(code) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
            {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let escaped = "35 24 0:30 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(escaped), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount("22 27 0:21 / /proc rw - proc proc rw\n"),
            None
        );
    }
}
