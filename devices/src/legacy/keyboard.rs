//! The PS/2 keyboard behind the i8042: enough of one for Linux's `atkbd` to bind to it, so
//! that the VMM can press Ctrl+Alt+Del (Firecracker's `SendCtrlAltDel`).
//!
//! It answers the keyboard commands `atkbd` sends while probing (identify, reset, scancode
//! set, LEDs, typematic rate, enable) and queues the scancodes of key presses the VMM
//! injects. It knows nothing about ports or interrupts: the controller moves its bytes to the
//! data port and raises the keyboard interrupt.

use std::collections::VecDeque;

/// Bytes the keyboard holds for the controller; a real keyboard's buffer is about as small.
pub const KEYBOARD_BUFFER: usize = 16;

// Keyboard commands (written to the data port with no controller command pending).
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;

// Keyboard answers.
const ACK: u8 = 0xfa;
const SELF_TEST_PASSED: u8 = 0xaa;
/// An MF2 keyboard's identity.
const ID: [u8; 2] = [0xab, 0x83];
/// The scancode set in use (the controller translates set 2 for the guest when asked to).
const SCANCODE_SET: u8 = 2;

/// Ctrl, Alt and Delete pressed, then released in reverse order, in scancode set 1: what
/// the guest reads when the controller translates (Linux's default).
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same keys in scancode set 2 (a release is 0xf0 before the key's code), for a guest
/// that turned translation off.
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// The keyboard's output buffer is full: the guest is not reading it.
#[derive(Debug, PartialEq, Eq)]
pub struct BufferFull;

/// A PS/2 keyboard's command handling and output buffer.
#[derive(Debug, Default)]
pub struct Keyboard {
    output: VecDeque<u8>,
    /// A command that waits for its parameter byte.
    awaiting_parameter: Option<u8>,
}

impl Keyboard {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next byte for the guest.
    pub fn pop(&mut self) -> Option<u8> {
        self.output.pop_front()
    }

    /// Puts back a byte the controller could not deliver yet, ahead of the rest.
    pub fn unpop(&mut self, byte: u8) {
        self.output.push_front(byte);
    }

    /// A byte the guest sent to the keyboard: a command or a command's parameter.
    pub fn receive(&mut self, byte: u8) {
        if let Some(command) = self.awaiting_parameter.take() {
            self.queue(&[ACK]);
            if command == KBD_SCANCODE_SET && byte == 0 {
                // Parameter 0 asks which set is in use.
                self.queue(&[SCANCODE_SET]);
            }
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC => {
                self.awaiting_parameter = Some(byte);
                self.queue(&[ACK]);
            }
            KBD_GET_ID => self.queue(&[ACK, ID[0], ID[1]]),
            KBD_ECHO => self.queue(&[KBD_ECHO]),
            KBD_RESET => {
                // A reset clears what was waiting, then reports a passed self-test.
                self.output.clear();
                self.queue(&[ACK, SELF_TEST_PASSED]);
            }
            // Enable, disable, set defaults and the rest take no parameter and only
            // need the acknowledgement.
            _ => self.queue(&[ACK]),
        }
    }

    /// Queues a press and release of Ctrl+Alt+Del, in set 1 when the controller
    /// `translated` for the guest, else in set 2. All or nothing: a partial sequence
    /// would leave keys held down in the guest.
    pub fn press_ctrl_alt_del(&mut self, translated: bool) -> Result<(), BufferFull> {
        let keys = if translated {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        if self.output.len() + keys.len() > KEYBOARD_BUFFER {
            return Err(BufferFull);
        }
        self.output.extend(keys);
        Ok(())
    }

    /// Answers are dropped when the buffer is full, as a keyboard whose host stopped
    /// reading would drop them.
    fn queue(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.output.len() < KEYBOARD_BUFFER {
                self.output.push_back(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(kbd: &mut Keyboard) -> Vec<u8> {
        std::iter::from_fn(|| kbd.pop()).collect()
    }

    #[test]
    fn answers_the_atkbd_probe() {
        let mut kbd = Keyboard::new();
        kbd.receive(KBD_GET_ID);
        assert_eq!(drain(&mut kbd), [ACK, 0xab, 0x83]);
        kbd.receive(KBD_RESET);
        assert_eq!(drain(&mut kbd), [ACK, SELF_TEST_PASSED]);
        kbd.receive(KBD_ECHO);
        assert_eq!(drain(&mut kbd), [KBD_ECHO]);
        // Enable scanning: acknowledged.
        kbd.receive(0xf4);
        assert_eq!(drain(&mut kbd), [ACK]);
    }

    #[test]
    fn parameters_are_acknowledged_not_taken_for_commands() {
        let mut kbd = Keyboard::new();
        // LEDs with a parameter that happens to be the reset command's value.
        kbd.receive(KBD_SET_LEDS);
        kbd.receive(KBD_RESET);
        assert_eq!(drain(&mut kbd), [ACK, ACK]);
        kbd.receive(KBD_SCANCODE_SET);
        kbd.receive(0);
        assert_eq!(drain(&mut kbd), [ACK, ACK, SCANCODE_SET]);
        kbd.receive(KBD_SCANCODE_SET);
        kbd.receive(2);
        assert_eq!(drain(&mut kbd), [ACK, ACK]);
        kbd.receive(KBD_SET_TYPEMATIC);
        kbd.receive(KBD_GET_ID);
        assert_eq!(drain(&mut kbd), [ACK, ACK]);
    }

    #[test]
    fn ctrl_alt_del_in_both_sets() {
        let mut kbd = Keyboard::new();
        kbd.press_ctrl_alt_del(true).unwrap();
        assert_eq!(
            drain(&mut kbd),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        kbd.press_ctrl_alt_del(false).unwrap();
        assert_eq!(
            drain(&mut kbd),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn a_full_buffer_refuses_the_whole_sequence_and_drops_answers() {
        let mut kbd = Keyboard::new();
        kbd.press_ctrl_alt_del(true).unwrap();
        kbd.press_ctrl_alt_del(true).unwrap();
        assert_eq!(kbd.press_ctrl_alt_del(true), Err(BufferFull));
        kbd.receive(KBD_GET_ID);
        let out = drain(&mut kbd);
        assert_eq!(out.len(), KEYBOARD_BUFFER);
        assert_eq!(out[..8], out[8..], "two whole sequences, nothing more");
        kbd.unpop(0x42);
        assert_eq!(kbd.pop(), Some(0x42));
    }
}
