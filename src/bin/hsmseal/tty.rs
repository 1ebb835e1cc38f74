//! The PIN prompt on the controlling terminal.
//!
//! Hand-written rather than `rpassword`: that crate grows a `String` one
//! character at a time, and each reallocation leaves an unwiped copy of the
//! PIN typed so far in freed memory. Here the terminal's echo is turned off
//! (line editing stays the kernel's: canonical mode), and the line is read
//! into one fixed zeroizing buffer that becomes the `Pin` itself.
//!
//! Invariant: the terminal's settings are restored on every way out: when
//! the read ends or fails (`EchoOff`'s drop), and when SIGINT or SIGTERM
//! stops the run while the prompt waits (`restore`, which `signals::stop`
//! runs before the process exits).

use hsmseal::secret::Pin;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// The longest PIN line read (PKCS#11 PINs are short).
const MAX_LINE: usize = 1024;

/// The terminal's descriptor and its settings before echo was turned off,
/// while a prompt waits: what `restore` puts back.
static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);

/// Puts back the terminal settings a waiting prompt changed (nothing if
/// none waits). Called from the signal thread before the process exits.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, t)) = saved {
        // SAFETY: `t` is what tcgetattr returned for `fd`, which stays open
        // while the prompt waits (the main thread is blocked reading it).
        unsafe {
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// Echo off on `tty` for as long as this lives.
struct EchoOff<'a> {
    tty: &'a File,
    saved: libc::termios,
}

impl<'a> EchoOff<'a> {
    fn new(tty: &'a File) -> std::io::Result<Self> {
        let fd = tty.as_raw_fd();
        // SAFETY: termios is plain data, filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is an open descriptor; t is a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let saved = t;
        // No echo of what is typed, but of the final newline; the kernel
        // still edits the line (backspace, Ctrl-U) and turns Ctrl-C into
        // SIGINT.
        t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK);
        t.c_lflag |= libc::ECHONL | libc::ICANON;
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, saved));
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
            let e = std::io::Error::last_os_error();
            SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(e);
        }
        Ok(EchoOff { tty, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
        // SAFETY: as in `new`.
        unsafe {
            libc::tcsetattr(self.tty.as_raw_fd(), libc::TCSANOW, &self.saved);
        }
    }
}

/// Prints `prompt` on the controlling terminal and reads one line without
/// echo. `Ok(None)` if the line is empty or the terminal was closed (EOF).
pub fn read_pin(prompt: &str) -> std::io::Result<Option<Pin>> {
    let tty = OpenOptions::new().read(true).write(true).open("/dev/tty")?;
    let echo_off = EchoOff::new(&tty)?;
    (&tty).write_all(prompt.as_bytes())?;
    let mut buf = Zeroizing::new(vec![0u8; MAX_LINE + 1]);
    let mut n = 0;
    let mut reader = &tty;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    drop(echo_off);
    let line_end = buf[..n].iter().position(|&b| b == b'\n');
    if line_end.is_none() && n > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the PIN typed is longer than {MAX_LINE} bytes"),
        ));
    }
    // Shortening never reallocates: the buffer stays the one wiped.
    buf.truncate(line_end.unwrap_or(n));
    while buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.is_empty() {
        return Ok(None);
    }
    Pin::from_utf8(buf).map(Some).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the PIN typed is not UTF-8 text",
        )
    })
}
