//! Shared-secret tokens (the agents' and the server's): how strong one must be, and
//! fresh ones from the OS's random number generator.

use crate::{Error, Result};

/// 128 bits in hex digits (4 bits each).
const MIN_HEX: usize = 32;
/// 128 bits at base64's density (6 bits a character), for tokens not all hex.
const MIN_OTHER: usize = 22;

/// How to make a good token, for error messages.
pub const HOW_TO_MAKE: &str = "make one with `stretch keys token` (or `openssl rand -hex 32`)";

/// Refuse a token (surrounding whitespace ignored) that cannot carry 128 random bits:
/// all hex digits needs 32 of them, anything else 22 characters. `what` names the
/// token in the message (e.g. "the agent token in `FILE`"); the token is never shown.
pub fn check(what: &str, token: &str) -> Result<()> {
    let token = token.trim();
    let len = token.chars().count();
    let hex = token.chars().all(|c| c.is_ascii_hexdigit());
    let problem = if hex && len < MIN_HEX {
        format!(
            "{len} hex digits carry {} bits; at least {MIN_HEX} (128 bits) are needed",
            len * 4
        )
    } else if !hex && len < MIN_OTHER {
        format!(
            "{len} characters; at least {MIN_OTHER} (128 bits as base64) are needed, or {MIN_HEX} hex digits"
        )
    } else {
        return Ok(());
    };
    Err(Error::invalid_with_help(
        format!("{what} is too weak: {problem}"),
        HOW_TO_MAKE,
    ))
}

/// A fresh token: 256 bits from the OS, as 64 lowercase hex characters.
pub fn generate() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::failed("token", format!("the OS gave no random bytes: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(token: &str) -> Option<String> {
        check("the token", token).err().map(|e| match e {
            Error::Invalid { message, help } => {
                assert_eq!(help.as_deref(), Some(HOW_TO_MAKE));
                message
            }
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn hex_needs_32_digits() {
        assert_eq!(message(&"a".repeat(32)), None);
        assert_eq!(message(&"0123456789ABCDEF".repeat(4)), None);
        assert_eq!(
            message(&"f".repeat(31)).as_deref(),
            Some(
                "the token is too weak: 31 hex digits carry 124 bits; at least 32 (128 bits) are needed"
            )
        );
        // 22 characters are enough for base64, not for hex.
        assert!(message("0123456789abcdef012345").is_some());
    }

    #[test]
    fn others_need_22_characters() {
        assert_eq!(message("Zm9vYmFyYmF6cXV4Cg+/_-"), None);
        assert_eq!(message("s3cret-agent-token-xyz"), None);
        let short = message("s3cret-agent-token").unwrap();
        assert!(short.contains("18 characters; at least 22"), "{short}");
        assert!(!short.contains("s3cret"), "the token is echoed: {short}");
        assert!(message("").is_some());
    }

    #[test]
    fn whitespace_is_trimmed() {
        assert_eq!(message(&format!("  {}\n", "ab".repeat(16))), None);
        let m = message(&format!("{}\n\n    ", "ab".repeat(15))).unwrap();
        assert!(m.contains("30 hex digits"), "{m}");
    }

    #[test]
    fn generated_tokens_are_64_hex_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 64);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        assert_eq!(message(&a), None);
    }
}
