//! What the daemon's parts share: the cross-tenant scheduler and the loaded models.
//!
//! The tenant devices ([`crate::device`]) submit to it through [`crate::intake`], the
//! executor threads ([`crate::executor`]) take batches from it and run them on its
//! models; the daemon ([`crate::daemon`]) builds it and wires them.

use ai_infer_scheduler::Scheduler;

use crate::job::Job;
use crate::registry::ModelRegistry;

/// The scheduler and the model registry every tenant device and executor uses.
pub struct Engine {
    /// The cross-tenant scheduler; its jobs are admitted INFER requests.
    pub scheduler: Scheduler<Job>,
    /// The loaded models.
    pub registry: ModelRegistry,
}
