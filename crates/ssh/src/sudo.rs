//! Privilege through sudo: what a sudo target runs under `sudo -n`, and the
//! sudoers rule that allows exactly that and nothing else.
//!
//! A sudo target runs, as the user sudo runs as, only:
//! - the SFTP server: `sudo -n <sftp_server>` (no arguments);
//! - each configured command: `sudo -n /bin/sh -c <command>` (the argument
//!   vector `/bin/sh`, `-c`, `<command>`, the command exactly as
//!   configured).
//!
//! The lock guard of a command, the directory sync and the user id
//! lookups run as the SSH user, outside sudo, so the privileged command
//! lines never change from one deployment to the next and a sudoers rule
//! can list each one exactly.

/// Characters sudoers treats specially inside a command's arguments; each
/// is escaped with a backslash to stand for itself (`*?[]` would otherwise
/// be wildcards, matching other commands).
const SUDOERS_SPECIAL: &[char] = &[',', ':', '=', '!', '#', '*', '?', '[', ']'];

/// `word` as sudoers reads it back literally: special characters escaped
/// with a backslash, a backslash as four (sudoers unescapes twice: once
/// when it parses the file, once when it matches), and every whitespace
/// character that is not a single space between two words escaped (sudoers
/// would otherwise collapse runs of blanks).
pub fn sudoers_escape(word: &str) -> String {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::with_capacity(word.len() + 8);
    for (i, &c) in chars.iter().enumerate() {
        if c == '\\' {
            out.push_str("\\\\\\\\");
        } else if SUDOERS_SPECIAL.contains(&c) {
            out.push('\\');
            out.push(c);
        } else if c.is_whitespace() {
            let single = c == ' '
                && i > 0
                && i + 1 < chars.len()
                && !chars[i - 1].is_whitespace()
                && !chars[i + 1].is_whitespace();
            if !single {
                out.push('\\');
            }
            out.push(c);
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a sudoers rule can name `command` exactly: not empty, no
/// leading or trailing whitespace (sudoers cannot express trailing blanks),
/// no control characters but tabs. `Err` says why.
pub fn sudo_expressible(command: &str) -> Result<(), String> {
    if command.trim().is_empty() {
        return Err("is empty".into());
    }
    if command.trim() != command {
        return Err("starts or ends with whitespace, which a sudoers rule cannot name exactly".into());
    }
    if command.chars().any(|c| c.is_control() && c != '\t') {
        return Err("holds a control character, which a sudoers rule cannot name exactly".into());
    }
    Ok(())
}

/// The sudoers entry (one command) that allows `command` as a sudo target
/// runs it: `/bin/sh -c <command>`, escaped.
pub fn sudoers_command(command: &str) -> String {
    format!("/bin/sh -c {}", sudoers_escape(command))
}

/// The sudoers line that lets `user` run a sudo target's SFTP server (with
/// no arguments: `""`) and exactly these commands as root, without a
/// password, e.g. `deploy ALL=(root) NOPASSWD: /usr/lib/openssh/sftp-server
/// "", /bin/sh -c nginx -t, /bin/sh -c systemctl reload nginx`.
pub fn sudoers_rule(user: &str, sftp_server: &str, commands: &[&str]) -> String {
    let mut line = format!("{user} ALL=(root) NOPASSWD: {} \"\"", sudoers_escape(sftp_server));
    for c in commands {
        line.push_str(", ");
        line.push_str(&sudoers_command(c));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_commands_are_written_as_they_are() {
        assert_eq!(sudoers_escape("systemctl reload nginx"), "systemctl reload nginx");
        assert_eq!(
            sudoers_rule("deploy", "/usr/lib/openssh/sftp-server", &["nginx -t", "systemctl reload nginx"]),
            "deploy ALL=(root) NOPASSWD: /usr/lib/openssh/sftp-server \"\", /bin/sh -c nginx -t, \
             /bin/sh -c systemctl reload nginx"
        );
    }

    #[test]
    fn special_characters_and_blanks_are_escaped() {
        assert_eq!(sudoers_escape("a,b:c=d!e#f"), r"a\,b\:c\=d\!e\#f");
        assert_eq!(sudoers_escape("rm /x/*.pem ?[a]"), r"rm /x/\*.pem \?\[a\]");
        assert_eq!(sudoers_escape(r"a\b"), r"a\\\\b");
        assert_eq!(sudoers_escape("a  b\tc"), "a\\ \\ b\\\tc");
        assert_eq!(sudoers_escape("a;b|c$d'e\"f"), "a;b|c$d'e\"f");
    }

    #[test]
    fn commands_a_rule_cannot_name_are_told() {
        assert!(sudo_expressible("systemctl reload nginx").is_ok());
        assert!(sudo_expressible("a\tb").is_ok());
        for bad in ["", " x", "x ", "x\u{7}"] {
            assert!(sudo_expressible(bad).is_err(), "{bad:?}");
        }
    }
}
