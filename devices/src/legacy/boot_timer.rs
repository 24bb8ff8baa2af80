//! Measures how long the guest takes to reach its init.
//!
//! Boot time is a headline number for a microVM, and only the guest knows when it is
//! up. Its init writes [`BOOT_TIMER_MAGIC`] to port [`BOOT_TIMER_PORT`] (through
//! `/dev/port`, so no guest driver is needed); the first such write records the time
//! since the VMM started.

use std::fmt;
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The port the VMM places the boot timer at (length 1).
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The byte the guest writes once its init is running.
pub const BOOT_TIMER_MAGIC: u8 = 0x7b;

/// Called once, with the boot time, when the guest first writes the magic byte.
type InitReachedCallback = Box<dyn FnOnce(Duration) + Send>;

/// A one-port device that records when the guest reached init.
pub struct BootTimer {
    start: Instant,
    init_reached: Option<Duration>,
    on_init_reached: Option<InitReachedCallback>,
    /// Writes that were not a single magic byte.
    ignored_writes: u64,
}

impl fmt::Debug for BootTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootTimer")
            .field("start", &self.start)
            .field("init_reached", &self.init_reached)
            .field("ignored_writes", &self.ignored_writes)
            .finish_non_exhaustive()
    }
}

impl BootTimer {
    /// Creates a timer that measures from `start`, the instant the VMM started.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            init_reached: None,
            on_init_reached: None,
            ignored_writes: 0,
        }
    }

    /// Calls `callback` with the boot time when the guest reaches init, so the VMM can
    /// report it. It runs on the vCPU thread that handles the write, at most once.
    pub fn on_init_reached(mut self, callback: impl FnOnce(Duration) + Send + 'static) -> Self {
        self.on_init_reached = Some(Box::new(callback));
        self
    }

    /// Time from the VMM's start to the guest's first magic write, if it happened.
    pub fn init_reached(&self) -> Option<Duration> {
        self.init_reached
    }

    /// Number of writes that were not a single magic byte.
    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes
    }

    fn record(&mut self) {
        if self.init_reached.is_some() {
            // First write wins; a second init (or a replayed write) does not move the mark.
            log::debug!("Boot timer: magic written again, keeping the first time");
            return;
        }
        let elapsed = self.start.elapsed();
        self.init_reached = Some(elapsed);
        // One report: the owner's callback when it gave one, else the log.
        match self.on_init_reached.take() {
            Some(callback) => callback(elapsed),
            None => log::info!("guest reached init in {} ms", elapsed.as_millis()),
        }
    }
}

impl BusDevice for BootTimer {
    /// Reads return [`BOOT_TIMER_MAGIC`] once init was reached, else 0, in the first
    /// byte; any further bytes read as 0.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            if self.init_reached.is_some() {
                *first = BOOT_TIMER_MAGIC;
            }
        }
    }

    /// Only a 1-byte write of [`BOOT_TIMER_MAGIC`] at the port counts; anything else is
    /// counted and ignored.
    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [BOOT_TIMER_MAGIC]) => self.record(),
            _ => self.ignored_writes += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn read_port(timer: &mut BootTimer) -> u8 {
        let mut data = [0xaa; 1];
        timer.read(0, &mut data);
        data[0]
    }

    #[test]
    fn magic_is_recorded_once() {
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        let mut timer = BootTimer::new(start).on_init_reached(move |d| {
            tx.send(d).unwrap();
        });
        assert_eq!(timer.init_reached(), None);
        assert_eq!(read_port(&mut timer), 0);

        std::thread::sleep(Duration::from_millis(5));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = timer
            .init_reached()
            .expect("magic write must record the time");
        assert!(first >= Duration::from_millis(5));
        assert!(first <= start.elapsed());
        assert_eq!(rx.try_recv(), Ok(first));
        assert_eq!(read_port(&mut timer), BOOT_TIMER_MAGIC);

        // A second magic write changes neither the time nor calls back again.
        std::thread::sleep(Duration::from_millis(5));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(timer.init_reached(), Some(first));
        assert!(rx.try_recv().is_err());
        assert_eq!(timer.ignored_writes(), 0);
    }

    #[test]
    fn other_values_are_counted_and_ignored() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[0]);
        timer.write(0, &[BOOT_TIMER_MAGIC + 1]);
        // Wrong size, or the magic byte inside a wider write.
        timer.write(0, &[BOOT_TIMER_MAGIC, 0]);
        timer.write(0, &[]);
        // Wrong offset (an access that started inside the range but is not the port).
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        assert_eq!(timer.ignored_writes(), 5);
        assert_eq!(timer.init_reached(), None);
        assert_eq!(read_port(&mut timer), 0);
    }

    #[test]
    fn works_without_a_callback() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert!(timer.init_reached().is_some());
        let mut wide = [0xaa; 4];
        timer.read(0, &mut wide);
        assert_eq!(wide, [BOOT_TIMER_MAGIC, 0, 0, 0]);
    }
}
