//! The PCI side of the driver: finding the ai_infer function in sysfs and reading its
//! virtio capabilities.

pub mod caps;
pub mod sysfs;

pub use caps::{parse_virtio_caps, CapRegion, CapsError, VirtioCapType, VirtioCaps};
pub use sysfs::{PciFunction, SysfsError, SYSFS_PCI_DEVICES};
