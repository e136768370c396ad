//! A QMP (QEMU Machine Protocol) client on a unix socket, with a deadline
//! on every call: `device_add` blocks QEMU's whole monitor when a
//! vhost-user backend does not answer, and a host must never hang on it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a QMP call may take unless the caller says otherwise.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a QMP call failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed or the deadline passed.
    #[error("qmp: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU answered with an error.
    #[error("qmp {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("qmp: unexpected message {0}")]
    Protocol(String),
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(QMP_TIMEOUT))?;
        s.set_write_timeout(Some(QMP_TIMEOUT))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            events: Vec::new(),
            next_id: 1,
        };
        let greeting = q.read_message(Instant::now() + QMP_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "QMP deadline passed",
            )));
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QEMU closed the monitor",
            )));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line))
    }

    /// Runs `command` with `arguments` within [`QMP_TIMEOUT`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, QMP_TIMEOUT)
    }

    /// Runs `command`, waiting at most `timeout` for its answer.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.read_message(deadline)?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("").to_owned(),
                });
            }
            return Err(QmpError::Protocol(m.to_string()));
        }
    }

    /// Waits for an event named `name` whose data matches `matches`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let hit = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(hit) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.read_message(deadline)?;
            if hit(&m) {
                return Ok(m);
            }
            if m.get("event").is_some() {
                self.events.push(m);
            }
        }
    }
}
