//! The host's network interfaces, as far as attaching a tap to a guest needs to know.

use super::SysfsHost;

/// What a network interface name stands for on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetInterface {
    /// No interface of that name (or a name no interface can have).
    Missing,
    /// A tun/tap device in tap mode (Ethernet frames): what virtio-net attaches to.
    Tap,
    /// A tun/tap device in tun mode (IP packets, no Ethernet header).
    Tun,
    /// Any other interface: a NIC, a bridge, a veth, loopback.
    Other,
    /// Not known here: there is no `/sys/class/net` (aivmm runs in a jail without sysfs).
    /// Opening the tap checks it then: by name in the network namespace, and by mode.
    Unknown,
}

impl NetInterface {
    /// What the interface is, in words, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            NetInterface::Missing => "missing",
            NetInterface::Tap => "a tap device",
            NetInterface::Tun => "a tun device (IP packets without Ethernet header)",
            NetInterface::Other => "not a tun/tap device",
            NetInterface::Unknown => "unknown (no /sys/class/net here)",
        }
    }
}

/// Host network interfaces; [`SysfsHost`] reads `/sys/class/net`.
pub trait NetInterfaces {
    /// What the interface `name` is. Opening it is the device's business, later.
    fn interface(&self, name: &str) -> NetInterface;
}

/// Reads a tun/tap device's `tun_flags` ("0x1002"): the device's IFF_* flags.
fn parse_tun_flags(text: &str) -> Option<u32> {
    let t = text.trim();
    let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"))?;
    u32::from_str_radix(hex, 16).ok()
}

/// The mode bits of `tun_flags` (libc has them as `c_int`).
const IFF_TAP: u32 = libc::IFF_TAP.unsigned_abs();
const IFF_TUN: u32 = libc::IFF_TUN.unsigned_abs();

impl NetInterfaces for SysfsHost {
    fn interface(&self, name: &str) -> NetInterface {
        // The name becomes a path component: anything that could leave /sys/class/net is
        // no interface at all.
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return NetInterface::Missing;
        }
        let class = self.root.join("class/net");
        if !class.is_dir() {
            return NetInterface::Unknown;
        }
        let dir = class.join(name);
        if !dir.exists() {
            return NetInterface::Missing;
        }
        // Only tun/tap devices have `tun_flags`.
        match std::fs::read_to_string(dir.join("tun_flags"))
            .ok()
            .and_then(|s| parse_tun_flags(&s))
        {
            Some(flags) if flags & IFF_TAP != 0 => NetInterface::Tap,
            Some(flags) if flags & IFF_TUN != 0 => NetInterface::Tun,
            _ => NetInterface::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_flags_tell_taps_from_tuns_and_others() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let net = root.join("class/net");
        for (name, flags) in [
            ("tap0", Some("0x1002\n")),
            ("tun0", Some("0x1001\n")),
            ("eth0", None),
        ] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            if let Some(f) = flags {
                std::fs::write(net.join(name).join("tun_flags"), f).unwrap();
            }
        }
        let host = SysfsHost::with_root(root);
        assert_eq!(host.interface("tap0"), NetInterface::Tap);
        assert_eq!(host.interface("tun0"), NetInterface::Tun);
        assert_eq!(host.interface("eth0"), NetInterface::Other);
        assert_eq!(host.interface("tap1"), NetInterface::Missing);
        assert_eq!(host.interface("../net/tap0"), NetInterface::Missing);
        assert_eq!(host.interface(".."), NetInterface::Missing);
        assert_eq!(parse_tun_flags("0x0002"), Some(2));
        assert_eq!(parse_tun_flags("2"), None);
    }

    #[test]
    fn without_sysfs_an_interface_is_unknown_but_a_bad_name_still_missing() {
        // A jail has no /sys: the tap is checked when it is opened instead.
        let dir = tempfile::tempdir().unwrap();
        let host = SysfsHost::with_root(dir.path().join("absent"));
        assert_eq!(host.interface("tap0"), NetInterface::Unknown);
        assert_eq!(host.interface("../tap0"), NetInterface::Missing);
    }
}
