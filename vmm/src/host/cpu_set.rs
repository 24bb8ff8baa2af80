//! Sets of host CPUs in sysfs `cpulist` syntax.

use std::collections::BTreeSet;
use std::fmt;

/// A set of host CPU numbers, as in sysfs `cpulist` files ("0-3,8").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSet(BTreeSet<usize>);

/// Upper bound on CPU numbers we accept in a list; `cpu_set_t` holds 1024.
const MAX_CPU: usize = 1023;

impl CpuSet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut set = BTreeSet::new();
        for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (parse_cpu(a)?, parse_cpu(b)?),
                None => {
                    let c = parse_cpu(part)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(format!("range {part} is reversed"));
            }
            set.extend(lo..=hi);
        }
        Ok(CpuSet(set))
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.0.contains(&cpu)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn from_cpus(cpus: impl IntoIterator<Item = usize>) -> Self {
        CpuSet(cpus.into_iter().collect())
    }
}

fn parse_cpu(s: &str) -> Result<usize, String> {
    let c: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{}' is not a CPU number", s.trim()))?;
    if c > MAX_CPU {
        return Err(format!("CPU {c} is above the limit of {MAX_CPU}"));
    }
    Ok(c)
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.0.iter().copied().peekable();
        while let Some(lo) = iter.next() {
            let mut hi = lo;
            while iter.peek() == Some(&(hi + 1)) {
                hi += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_set_round_trips_through_display() {
        let s = CpuSet::parse("0-3, 8,10-11").unwrap();
        assert_eq!(s.to_string(), "0-3,8,10-11");
        assert!(CpuSet::parse("x").is_err());
        assert!(CpuSet::parse("5000").is_err());
    }
}
