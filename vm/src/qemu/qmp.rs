//! The few QMP messages the backend reads: the greeting, command returns, and the
//! SHUTDOWN event that tells a guest power-off from a reset or a panic.

use serde_json::Value;

/// One line from qemu's QMP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Greeting,
    Return,
    Error(String),
    /// `SHUTDOWN` with its reason (`guest-shutdown`, `guest-reset`, `guest-panic`,
    /// `host-qmp-quit`, `host-signal`, ...).
    Shutdown {
        reason: String,
    },
    /// `GUEST_PANICKED` and similar events that end the guest.
    Panicked,
    OtherEvent(String),
    Unknown,
}

/// Parses one QMP line; anything unexpected is `Unknown`, never an error.
pub fn parse(line: &str) -> Message {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Message::Unknown;
    };
    if v.get("QMP").is_some() {
        return Message::Greeting;
    }
    if v.get("return").is_some() {
        return Message::Return;
    }
    if let Some(e) = v.get("error") {
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Message::Error(desc.to_string());
    }
    match v.get("event").and_then(Value::as_str) {
        Some("SHUTDOWN") => {
            let reason = v
                .get("data")
                .and_then(|d| d.get("reason"))
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            Message::Shutdown { reason }
        }
        Some("GUEST_PANICKED") => Message::Panicked,
        Some(other) => Message::OtherEvent(other.to_string()),
        None => Message::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_qemu_sends() {
        assert_eq!(
            parse(r#"{"QMP": {"version": {}, "capabilities": []}}"#),
            Message::Greeting
        );
        assert_eq!(parse(r#"{"return": {}}"#), Message::Return);
        assert_eq!(
            parse(
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#
            ),
            Message::Shutdown {
                reason: "guest-shutdown".into()
            }
        );
        assert_eq!(
            parse(r#"{"error": {"class": "GenericError", "desc": "nope"}}"#),
            Message::Error("nope".into())
        );
        assert_eq!(
            parse(r#"{"event": "POWERDOWN"}"#),
            Message::OtherEvent("POWERDOWN".into())
        );
        assert_eq!(parse("garbage"), Message::Unknown);
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = parse(&s);
        }
    }
}
