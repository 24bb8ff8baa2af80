//! Where executors run: the CPUs of their device's NUMA node (from sysfs), or the
//! CPUs the operator lists, and pinning a thread to them.
//!
//! An executor reads inputs from and writes outputs to guest memory and drives one
//! device; running it on the CPUs of that device's node keeps its memory traffic
//! local. `executor_cpus` overrides the node settings, one CPU per executor.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::DaemonSection;

/// Where the kernel lists NUMA nodes (`nodeN/cpulist`).
pub const NODE_ROOT: &str = "/sys/devices/system/node";

/// Why the CPUs of a node are unknown.
#[derive(Debug, Error)]
pub enum NumaError {
    /// The node's cpulist could not be read (no such node, or no sysfs).
    #[error("cannot read the CPUs of NUMA node {node} from {path}: {source}")]
    Read {
        /// The node.
        node: u32,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The cpulist is not in the kernel's list format.
    #[error("NUMA node {node}: cannot parse cpulist {text:?}")]
    Parse {
        /// The node.
        node: u32,
        /// The text read.
        text: String,
    },
    /// The node has no CPUs (a memory-only node).
    #[error("NUMA node {0} has no CPUs to run executors on")]
    NoCpus(u32),
}

/// Parses the kernel's CPU list format (`0-3,8,10-11`) into sorted CPU numbers
/// below `CPU_SETSIZE`; `None` for anything else.
pub fn parse_cpulist(text: &str) -> Option<Vec<u32>> {
    let limit = libc::CPU_SETSIZE as u32;
    let mut cpus = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let cpu = part.trim().parse::<u32>().ok()?;
                (cpu, cpu)
            }
        };
        if first > last || last >= limit {
            return None;
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// The CPUs of `node`, read from `root/nodeN/cpulist` (`root` is [`NODE_ROOT`]
/// outside tests).
pub fn node_cpus(root: &Path, node: u32) -> Result<Vec<u32>, NumaError> {
    let path = root.join(format!("node{node}")).join("cpulist");
    let text = std::fs::read_to_string(&path).map_err(|source| NumaError::Read {
        node,
        path: path.clone(),
        source,
    })?;
    let cpus = parse_cpulist(&text).ok_or_else(|| NumaError::Parse {
        node,
        text: text.trim().to_owned(),
    })?;
    if cpus.is_empty() {
        return Err(NumaError::NoCpus(node));
    }
    Ok(cpus)
}

/// The CPUs each of `daemon.executor_threads` executors is pinned to (`None` = not
/// pinned): `executor_cpus[i % len]` if given, else the CPUs of `numa_node` or of
/// `executor_numa_nodes[i % len]`.
pub fn executor_placement(
    daemon: &DaemonSection,
    root: &Path,
) -> Result<Vec<Option<Vec<u32>>>, NumaError> {
    let threads = daemon.executor_threads as usize;
    if !daemon.executor_cpus.is_empty() {
        let cpus = &daemon.executor_cpus;
        return Ok((0..threads)
            .map(|i| Some(vec![cpus[i % cpus.len()]]))
            .collect());
    }
    let nodes: Vec<u32> = match daemon.numa_node {
        Some(node) => vec![node],
        None => daemon.executor_numa_nodes.clone(),
    };
    if nodes.is_empty() {
        return Ok(vec![None; threads]);
    }
    let mut by_node = std::collections::BTreeMap::new();
    for node in &nodes {
        if !by_node.contains_key(node) {
            by_node.insert(*node, node_cpus(root, *node)?);
        }
    }
    Ok((0..threads)
        .map(|i| by_node.get(&nodes[i % nodes.len()]).cloned())
        .collect())
}

/// Pins the calling thread to `cpus` (each below `CPU_SETSIZE`).
pub fn pin_current_thread(cpus: &[u32]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        let cpu = *cpu as usize;
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the pointer and size describe `set`.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Fake `node<N>/cpulist` files under `name` in a new temporary directory (removed
    /// when the guard drops), and the path of `name`.
    fn fake_nodes(name: &str, lists: &[(u32, &str)]) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join(name);
        for (node, list) in lists {
            let dir = root.join(format!("node{node}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cpulist"), list).unwrap();
        }
        (tmp, root)
    }

    fn daemon(extra: &str) -> DaemonSection {
        let text = format!(
            "[daemon]\nmodels = \"m\"\n{extra}\n[[tenant]]\nname = \"t\"\nsocket = \"/tmp/t\"\n"
        );
        Config::parse(&text).unwrap().daemon
    }

    #[test]
    fn cpulists_parse_ranges_and_singles() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist("5"), Some(vec![5]));
        assert_eq!(parse_cpulist("\n"), Some(vec![]));
        for bad in ["3-1", "a", "1,,2", "0-99999", "-1"] {
            assert_eq!(parse_cpulist(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn executors_get_their_nodes_cpus_and_explicit_cpus_win() {
        let (_tmp, root) = fake_nodes("place", &[(0, "0-1\n"), (1, "2,3\n"), (2, "\n")]);
        let one = executor_placement(&daemon("executor_threads = 2\nnuma_node = 1"), &root);
        assert_eq!(one.unwrap(), vec![Some(vec![2, 3]), Some(vec![2, 3])]);
        let per = executor_placement(
            &daemon("executor_threads = 3\nexecutor_numa_nodes = [0, 1]"),
            &root,
        );
        assert_eq!(
            per.unwrap(),
            vec![Some(vec![0, 1]), Some(vec![2, 3]), Some(vec![0, 1])]
        );
        let explicit = executor_placement(
            &daemon("executor_threads = 2\nnuma_node = 1\nexecutor_cpus = [7]"),
            &root,
        );
        assert_eq!(explicit.unwrap(), vec![Some(vec![7]), Some(vec![7])]);
        let none = executor_placement(&daemon("executor_threads = 2"), &root);
        assert_eq!(none.unwrap(), vec![None, None]);
        assert!(matches!(
            executor_placement(&daemon("numa_node = 2"), &root),
            Err(NumaError::NoCpus(2))
        ));
        assert!(matches!(
            executor_placement(&daemon("numa_node = 9"), &root),
            Err(NumaError::Read { node: 9, .. })
        ));
    }

    #[test]
    fn pinning_to_this_machines_node_0_works() {
        // Every Linux system with sysfs has node 0 (or no NUMA directory at all).
        let Ok(cpus) = node_cpus(Path::new(NODE_ROOT), 0) else {
            return;
        };
        let handle = std::thread::spawn(move || pin_current_thread(&cpus));
        handle.join().unwrap().unwrap();
        assert!(pin_current_thread(&[libc::CPU_SETSIZE as u32]).is_err());
    }
}
