//! The files a dynamically linked program needs at run time: its ELF interpreter (the
//! `PT_INTERP` path) and the shared libraries that interpreter resolves.
//!
//! The libraries are found the way `ldd` finds them: by running the interpreter with
//! `--list` on the program, with an empty environment (so `LD_LIBRARY_PATH` and
//! `LD_PRELOAD` play no part, as they play none in the jail). The interpreter only maps
//! and resolves the program; none of the program's code runs. The paths it prints are the
//! paths the jail gets, so the loader inside the jail finds the same files in its default
//! directories.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

const PT_INTERP: u32 = 3;
/// A longer PT_INTERP is not a path the kernel would accept (PATH_MAX).
const MAX_INTERP_LEN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("{0} is not a 64-bit little-endian ELF executable")]
    NotElf(PathBuf),
    #[error("{0} has a malformed ELF program header table")]
    BadHeaders(PathBuf),
    #[error("cannot run the ELF interpreter {interp} --list {exec}: {source}")]
    RunInterpreter {
        interp: PathBuf,
        exec: PathBuf,
        source: io::Error,
    },
    #[error("{interp} --list {exec} failed: {message}")]
    List {
        interp: PathBuf,
        exec: PathBuf,
        message: String,
    },
    #[error("{exec} needs {library}, which the host does not have")]
    NotFound { exec: PathBuf, library: String },
}

/// The interpreter and the libraries `exec` needs, as absolute host paths; empty for a
/// statically linked program.
pub fn runtime_files(exec: &Path) -> Result<Vec<PathBuf>, LibsError> {
    let Some(interp) = interpreter(exec)? else {
        return Ok(Vec::new());
    };
    let output = Command::new(&interp)
        .arg("--list")
        .arg(exec)
        .env_clear()
        .output()
        .map_err(|source| LibsError::RunInterpreter {
            interp: interp.clone(),
            exec: exec.to_path_buf(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr
            .lines()
            .chain(stdout.lines())
            .next()
            .unwrap_or("no output")
            .trim()
            .to_string();
        return Err(LibsError::List {
            interp,
            exec: exec.to_path_buf(),
            message: format!("{} ({message})", output.status),
        });
    }
    let mut files = vec![interp.clone()];
    for path in parse_list(&stdout).map_err(|library| LibsError::NotFound {
        exec: exec.to_path_buf(),
        library,
    })? {
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// The `PT_INTERP` path of an ELF64 little-endian file, if it has one.
pub fn interpreter(exec: &Path) -> Result<Option<PathBuf>, LibsError> {
    let read_err = |e| LibsError::Read(exec.to_path_buf(), e);
    let mut file = File::open(exec).map_err(read_err)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .map_err(|_| LibsError::NotElf(exec.to_path_buf()))?;
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(LibsError::NotElf(exec.to_path_buf()));
    }
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([header[0x36], header[0x37]]);
    let phnum = u16::from_le_bytes([header[0x38], header[0x39]]);
    if phentsize < 56 {
        return Err(LibsError::BadHeaders(exec.to_path_buf()));
    }
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        let offset = phoff
            .checked_add(i * u64::from(phentsize))
            .ok_or_else(|| LibsError::BadHeaders(exec.to_path_buf()))?;
        file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
        file.read_exact(&mut ph)
            .map_err(|_| LibsError::BadHeaders(exec.to_path_buf()))?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_INTERP {
            continue;
        }
        let p_offset = u64::from_le_bytes(ph[8..16].try_into().unwrap_or_default());
        let p_filesz = u64::from_le_bytes(ph[32..40].try_into().unwrap_or_default());
        if p_filesz == 0 || p_filesz > MAX_INTERP_LEN {
            return Err(LibsError::BadHeaders(exec.to_path_buf()));
        }
        let mut path = vec![0u8; usize::try_from(p_filesz).unwrap_or(0)];
        file.seek(SeekFrom::Start(p_offset)).map_err(read_err)?;
        file.read_exact(&mut path)
            .map_err(|_| LibsError::BadHeaders(exec.to_path_buf()))?;
        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
        path.truncate(end);
        let path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        if !path.is_absolute() {
            return Err(LibsError::BadHeaders(exec.to_path_buf()));
        }
        return Ok(Some(path));
    }
    Ok(None)
}

/// The absolute paths in the interpreter's `--list` output; `Err(name)` for a library it
/// could not find. Lines look like `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)` or `linux-vdso.so.1 (0x...)` (in the kernel, no
/// file).
fn parse_list(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err(name.trim().to_string());
                }
                target
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_list() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_list(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_list("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "libfoo.so.1"
        );
    }

    /// An ELF64 LE header with `phnum` program headers of 56 bytes at offset 64.
    fn elf_header(phnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        h
    }

    #[test]
    fn static_and_malformed_elf_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("static");
        std::fs::write(&file, elf_header(0)).unwrap();
        assert_eq!(interpreter(&file).unwrap(), None);
        assert!(runtime_files(&file).unwrap().is_empty());
        // Two program headers promised, none there.
        std::fs::write(&file, elf_header(2)).unwrap();
        assert!(matches!(interpreter(&file), Err(LibsError::BadHeaders(_))));
        // A PT_INTERP whose path runs past the end of the file.
        let mut elf = elf_header(1);
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&PT_INTERP.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[32..40].copy_from_slice(&100u64.to_le_bytes());
        elf.extend_from_slice(&ph);
        std::fs::write(&file, &elf).unwrap();
        assert!(matches!(interpreter(&file), Err(LibsError::BadHeaders(_))));
        // The same with the path there.
        elf.extend_from_slice(b"/lib64/ld-test.so\0");
        elf.resize(220, 0);
        std::fs::write(&file, &elf).unwrap();
        assert_eq!(
            interpreter(&file).unwrap(),
            Some(PathBuf::from("/lib64/ld-test.so"))
        );
        std::fs::write(&file, b"#!/bin/sh\n").unwrap();
        assert!(matches!(interpreter(&file), Err(LibsError::NotElf(_))));
    }

    #[test]
    fn reads_the_interpreter_of_this_test() {
        let me = std::env::current_exe().unwrap();
        // Whatever the toolchain, a PT_INTERP (if any) is an absolute path that exists.
        if let Some(interp) = interpreter(&me).unwrap() {
            assert!(interp.exists(), "{}", interp.display());
            assert!(runtime_files(&me).unwrap().contains(&interp));
        }
        assert!(matches!(
            interpreter(Path::new("/proc/self/status")),
            Err(LibsError::NotElf(_))
        ));
    }
}
