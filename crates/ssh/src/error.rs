//! Turning SSH and SFTP failures into [`StepError`]s: transient when a
//! retry can help (the connection, a timeout), permanent when it cannot
//! (host key, authentication, permissions, a missing directory or
//! extension). Messages name the host and the path, never file content.

use certdeploy_core::StepError;
use openssh_sftp_client::Error as SftpError;
use openssh_sftp_client::error::SftpErrorKind;

/// Is this SFTP error a lost channel or master (as opposed to an answer
/// from the server)? Such errors mark the connection dead.
/// The first of `errors` that is a connection loss: of requests sent
/// together, that one decides before any other failure.
pub(crate) fn first_connection_loss<'e>(
    errors: impl IntoIterator<Item = Option<&'e SftpError>>,
) -> Option<&'e SftpError> {
    errors.into_iter().flatten().find(|e| sftp_is_connection_loss(e))
}

pub(crate) fn sftp_is_connection_loss(e: &SftpError) -> bool {
    match e {
        SftpError::SftpError(..)
        | SftpError::UnsupportedExtension(_)
        | SftpError::BufferTooLong(_)
        | SftpError::HandleTooLong
        | SftpError::UnsupportedSftpProtocol { .. }
        | SftpError::SftpServerHelloMsgTooLong { .. } => false,
        SftpError::RecursiveErrors(r) => sftp_is_connection_loss(&r.original_error),
        _ => true,
    }
}

/// The server's own message for an SFTP status error (e.g. "Permission
/// denied"), or the error's description.
pub(crate) fn sftp_detail(e: &SftpError) -> String {
    match e {
        SftpError::SftpError(kind, msg) => {
            let (m, _) = msg.get();
            if m.is_empty() { format!("{kind:?}") } else { m.to_string() }
        }
        SftpError::UnsupportedExtension(x) => format!("the SFTP server lacks the {x}@openssh.com extension"),
        e if sftp_is_connection_loss(e) => format!("SFTP channel lost ({e})"),
        e => e.to_string(),
    }
}

pub(crate) fn sftp_kind(e: &SftpError) -> Option<SftpErrorKind> {
    match e {
        SftpError::SftpError(kind, _) => Some(*kind),
        SftpError::RecursiveErrors(r) => sftp_kind(&r.original_error),
        _ => None,
    }
}

pub(crate) fn is_no_such_file(e: &SftpError) -> bool {
    matches!(sftp_kind(e), Some(SftpErrorKind::NoSuchFile))
}

/// Classify an SFTP failure of `op` on `path` at `host`.
pub(crate) fn sftp_error(host: &str, op: &str, path: &str, e: &SftpError) -> StepError {
    let msg = format!("{host}: {op} {path}: {}", sftp_detail(e));
    if sftp_is_connection_loss(e) {
        StepError::transient(format!("{msg}; outcome unknown"))
    } else {
        StepError::permanent(msg)
    }
}

/// Classify a failure to open the master connection from ssh's own words
/// (ssh reports these only as text in its log).
pub(crate) fn connect_error(host: &str, e: &openssh::Error) -> StepError {
    let mut text = String::new();
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s.to_string());
        src = s.source();
    }
    let detail = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let lower = detail.to_ascii_lowercase();
    let permanent = [
        ("host key verification failed", "host key verification failed"),
        ("remote host identification has changed", "host key verification failed (the host key changed)"),
        ("no ed25519 host key is known", "host key verification failed (unknown host)"),
        ("host key is known", "host key verification failed (unknown host)"),
        ("permission denied", "authentication failed"),
        ("too many authentication failures", "authentication failed"),
        ("no matching host key type", "no common host key algorithm"),
        ("bad configuration option", "bad ssh configuration"),
    ];
    for (needle, what) in permanent {
        if lower.contains(needle) {
            return StepError::permanent(format!("{host}: {what}: {detail}"));
        }
    }
    StepError::transient(format!("{host}: cannot connect: {detail}"))
}

/// Quote a string for a POSIX shell (single quotes).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
