//! `[[net]]`: virtio-net devices, each attached to a tap interface that already exists on
//! the host (aivmm never creates one).

use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Deserializer};

use super::{check_id, ConfigError};
use crate::host::{NetInterface, NetInterfaces};

/// Smallest MTU the guest may be told (IPv4's minimum datagram).
pub const MIN_MTU: u16 = 68;
/// Longest interface name (`IFNAMSIZ` less the NUL).
const MAX_IFNAME_LEN: usize = 15;

/// An Ethernet address, written `06:00:ac:10:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A group address: the I/G bit (bit 0 of the first byte) is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six colon-separated pairs of hex digits, either case.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| format!("'{s}' has fewer than 6 parts"))?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("'{part}' in '{s}' is not two hex digits"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|e| format!("'{part}': {e}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("'{s}' has more than 6 parts"));
        }
        Ok(MacAddr(bytes))
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("invalid MAC address: {e}")))
    }
}

/// A virtio-net device on a host tap.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique among net devices; 1-64 characters of `[A-Za-z0-9_-]`.
    pub id: String,
    /// The host tap interface; it must exist and be in tap mode.
    pub tap: String,
    /// The guest's MAC address (unicast, unique). Default: none offered, the guest
    /// driver picks a random one.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// The MTU offered to the guest (`VIRTIO_NET_F_MTU`), 68..=65535. Default: not offered.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Limits on what the guest receives (bytes and packets).
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Checks every net device and the set of them against the host's interfaces.
pub(super) fn validate(
    nets: &[NetConfig],
    host: &dyn NetInterfaces,
) -> Result<Vec<NetConfig>, ConfigError> {
    let mut ids = HashSet::new();
    let mut taps: HashMap<&str, &str> = HashMap::new();
    let mut macs: HashMap<MacAddr, &str> = HashMap::new();
    for n in nets {
        check_id("net", &n.id)?;
        if !ids.insert(n.id.as_str()) {
            return Err(ConfigError::DuplicateId {
                what: "net",
                id: n.id.clone(),
            });
        }
        check_tap(n, host)?;
        if let Some(first) = taps.insert(&n.tap, &n.id) {
            return Err(ConfigError::DuplicateTap {
                tap: n.tap.clone(),
                first: first.to_string(),
                second: n.id.clone(),
            });
        }
        if let Some(mac) = n.mac {
            if mac.is_multicast() {
                return Err(ConfigError::MulticastMac {
                    id: n.id.clone(),
                    mac,
                });
            }
            if mac.is_zero() {
                return Err(ConfigError::ZeroMac { id: n.id.clone() });
            }
            if let Some(first) = macs.insert(mac, &n.id) {
                return Err(ConfigError::DuplicateMac {
                    mac,
                    first: first.to_string(),
                    second: n.id.clone(),
                });
            }
        }
        if let Some(mtu) = n.mtu.filter(|m| *m < MIN_MTU) {
            return Err(ConfigError::MtuTooSmall {
                id: n.id.clone(),
                mtu,
            });
        }
        for (field, limiter) in [
            ("rx_rate_limiter", &n.rx_rate_limiter),
            ("tx_rate_limiter", &n.tx_rate_limiter),
        ] {
            if let Some(rl) = limiter {
                rl.validate().map_err(|source| ConfigError::RateLimiter {
                    device: format!("net '{}'", n.id),
                    field,
                    source,
                })?;
            }
        }
    }
    Ok(nets.to_vec())
}

/// The tap's name is one the kernel accepts, and the host has it as a tap.
fn check_tap(n: &NetConfig, host: &dyn NetInterfaces) -> Result<(), ConfigError> {
    let t = n.tap.as_str();
    let valid = !t.is_empty()
        && t.len() <= MAX_IFNAME_LEN
        && t != "."
        && t != ".."
        && !t
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if !valid {
        return Err(ConfigError::BadTapName {
            id: n.id.clone(),
            tap: n.tap.clone(),
        });
    }
    match host.interface(t) {
        // Unknown: checked when the device opens the tap.
        NetInterface::Tap | NetInterface::Unknown => Ok(()),
        NetInterface::Missing => Err(ConfigError::NoSuchTap {
            id: n.id.clone(),
            tap: n.tap.clone(),
        }),
        other => Err(ConfigError::NotATap {
            id: n.id.clone(),
            tap: n.tap.clone(),
            kind: other.describe(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parse, pt_base};
    use super::*;
    use crate::test_support::FakeSys;

    /// A host whose interfaces are the listed (name, kind) pairs.
    struct FakeNet(Vec<(&'static str, NetInterface)>);

    impl NetInterfaces for FakeNet {
        fn interface(&self, name: &str) -> NetInterface {
            self.0
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(NetInterface::Missing, |(_, k)| *k)
        }
    }

    fn host() -> FakeNet {
        FakeNet(vec![
            ("tap0", NetInterface::Tap),
            ("tap1", NetInterface::Tap),
            ("tun0", NetInterface::Tun),
            ("eth0", NetInterface::Other),
        ])
    }

    fn net(id: &str, tap: &str, mac: Option<&str>) -> NetConfig {
        NetConfig {
            id: id.into(),
            tap: tap.into(),
            mac: mac.map(|m| m.parse().unwrap()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn mac_addresses_parse_and_print_the_same_way() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac, MacAddr([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        assert!(!mac.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06:00:ac:10:00:0g",
            "06-00-ac-10-00-02",
            "+6:00:ac:10:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn toml_net_defaults_and_bad_values() {
        let cfg = parse("[[net]]\nid = \"eth0\"\ntap = \"tap0\"\n").unwrap();
        assert_eq!(cfg.net, vec![net("eth0", "tap0", None)]);
        let cfg = parse(
            "[[net]]\nid = \"eth0\"\ntap = \"tap0\"\nmac = \"06:00:ac:10:00:02\"\nmtu = 9000\n",
        )
        .unwrap();
        assert_eq!(cfg.net[0].mac.unwrap().to_string(), "06:00:ac:10:00:02");
        assert_eq!(cfg.net[0].mtu, Some(9000));
        let err = parse("[[net]]\nid = \"e\"\ntap = \"tap0\"\nmac = \"06:00\"\n").unwrap_err();
        assert!(err.to_string().contains("invalid MAC address"), "{err}");
        let err = parse("[[net]]\nid = \"e\"\ntap = \"tap0\"\nmtu = 70000\n").unwrap_err();
        assert!(err.to_string().contains("70000"), "{err}");
        let err =
            parse("[[net]]\nid = \"e\"\ntap = \"tap0\"\nhost_dev_name = \"x\"\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `host_dev_name`"),
            "{err}"
        );
    }

    #[test]
    fn the_tap_must_exist_and_be_a_tap() {
        let h = host();
        assert_eq!(validate(&[net("n", "tap0", None)], &h).unwrap().len(), 1);
        let err = validate(&[net("n", "tap9", None)], &h).unwrap_err();
        assert!(matches!(err, ConfigError::NoSuchTap { .. }), "{err}");
        assert!(
            err.to_string().contains("ip tuntap add tap9 mode tap"),
            "{err}"
        );
        let err = validate(&[net("n", "tun0", None)], &h).unwrap_err();
        assert!(matches!(err, ConfigError::NotATap { .. }), "{err}");
        assert!(err.to_string().contains("tun device"), "{err}");
        let err = validate(&[net("n", "eth0", None)], &h).unwrap_err();
        assert!(err.to_string().contains("not a tun/tap device"), "{err}");
        for bad in ["", "a/b", "..", "a b", "x:1", "sixteen-chars-xx"] {
            let err = validate(&[net("n", bad, None)], &h).unwrap_err();
            assert!(
                matches!(err, ConfigError::BadTapName { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn ids_taps_and_macs_are_unique() {
        let h = host();
        let err = validate(&[net("n", "tap0", None), net("n", "tap1", None)], &h).unwrap_err();
        assert_eq!(err.to_string(), "net id 'n' is used twice");
        let err = validate(&[net("a", "tap0", None), net("b", "tap0", None)], &h).unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateTap { .. }), "{err}");
        let mac = Some("06:00:00:00:00:01");
        let err = validate(&[net("a", "tap0", mac), net("b", "tap1", mac)], &h).unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateMac { .. }), "{err}");
        assert!(
            err.to_string().contains("06:00:00:00:00:01") && err.to_string().contains("'b'"),
            "{err}"
        );
        let err = validate(&[net("bad id", "tap0", None)], &h).unwrap_err();
        assert!(
            matches!(err, ConfigError::BadId { what: "net", .. }),
            "{err}"
        );
    }

    #[test]
    fn mac_must_be_unicast_and_mtu_at_least_68() {
        let h = host();
        let err = validate(&[net("a", "tap0", Some("01:00:5e:00:00:01"))], &h).unwrap_err();
        assert!(matches!(err, ConfigError::MulticastMac { .. }), "{err}");
        assert!(err.to_string().contains("01:00:5e:00:00:01"), "{err}");
        let err = validate(&[net("a", "tap0", Some("00:00:00:00:00:00"))], &h).unwrap_err();
        assert!(matches!(err, ConfigError::ZeroMac { .. }), "{err}");
        let mut n = net("a", "tap0", None);
        n.mtu = Some(67);
        let err = validate(&[n.clone()], &h).unwrap_err();
        assert!(
            matches!(err, ConfigError::MtuTooSmall { mtu: 67, .. }),
            "{err}"
        );
        n.mtu = Some(68);
        assert!(validate(&[n], &h).is_ok());
    }

    #[test]
    fn rx_and_tx_rate_limiters_are_checked_each() {
        let h = host();
        let text = "[[net]]\nid = \"n\"\ntap = \"tap0\"\n\
                    rx_rate_limiter = { ops = { size = 100, refill_time = 10 } }\n\
                    tx_rate_limiter = { bandwidth = { size = 1000, one_time_burst = 5000, refill_time = 100 } }\n";
        let cfg = parse(text).unwrap();
        assert_eq!(
            cfg.net[0]
                .tx_rate_limiter
                .unwrap()
                .bandwidth
                .unwrap()
                .one_time_burst,
            5000
        );
        assert!(validate(&cfg.net, &h).is_ok());
        for (field, bad) in [
            ("rx_rate_limiter", text.replace("size = 100,", "size = 0,")),
            (
                "tx_rate_limiter",
                text.replace("refill_time = 100 }", "refill_time = 0 }"),
            ),
        ] {
            let cfg = parse(&bad).unwrap();
            let err = validate(&cfg.net, &h).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("net 'n' {field} is invalid: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_tap_is_looked_up_in_sysfs_through_validate() {
        let sys = FakeSys::new("net-validate", 0);
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32")
            + "[[net]]\nid = \"eth0\"\ntap = \"tap0\"\nmac = \"06:00:ac:10:00:02\"\n";
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::NoSuchTap { .. }), "{err}");
        let dir = sys.root().join("class/net/tap0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tun_flags"), "0x1002\n").unwrap();
        let v = parse(&text).unwrap().validate(&sys.host(), 64).unwrap();
        assert_eq!(v.net.len(), 1);
        assert_eq!(v.net[0].tap, "tap0");
    }
}
