//! `certdeploy check`: probe a target without changing anything on it.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use certdeploy_core::{Role, TargetSpec};

use crate::error::{is_no_such_file, sftp_detail, shell_quote};
use crate::hostile::TargetPolicy;
use crate::pool::{ExecFailure, HostAddr, SshPool};

/// One line of a check report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl CheckLine {
    fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> CheckLine {
        CheckLine { name: name.into(), ok, detail: detail.into() }
    }
}

fn parent_of(path: &str) -> String {
    match path.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => path[..i].to_string(),
        None => ".".into(),
    }
}

/// Connect (host key, authentication), check the SFTP extensions, that
/// every target directory exists and is writable (a probe file is created
/// and removed), that every configured path passes the link and owner
/// rules under `policy` (the deployment's own checks, reads
/// only), and that the validate and reload commands' programs exist.
///
/// A sudo target (`addr.sudo`) also gets: a `sudo sftp-server` line (the
/// SFTP server started through `sudo -n`, and the uid it runs as), and per
/// command a `sudo …` line from `sudo -n -l /bin/sh -c <command>` (sudo's
/// own answer whether the rule allows exactly that, without running it);
/// a refusal names sudo, quotes it, and shows the sudoers rule to grant.
pub async fn check(pool: &SshPool, addr: &HostAddr, target: &TargetSpec, policy: &TargetPolicy) -> Vec<CheckLine> {
    check_with_extra(pool, addr, target, &[], policy).await
}

/// [`check`] with a configured target's extra files (bundle, keystore) by
/// role, checked like the others (their directory, links and owner).
pub async fn check_with_extra(
    pool: &SshPool,
    addr: &HostAddr,
    target: &TargetSpec,
    extra: &[(Role, &str)],
    policy: &TargetPolicy,
) -> Vec<CheckLine> {
    let mut lines = Vec::new();
    let lease = match pool.lease(addr).await {
        Ok(l) => {
            lines.push(CheckLine::new(
                "connect",
                true,
                format!("{}@{addr}: host key and authentication ok", addr.user),
            ));
            l
        }
        // The master came up (the message is sudo's): say so on a line of
        // its own.
        Err(e) if addr.sudo.as_ref().is_some_and(|s| e.message.contains(&format!("`sudo -n {s}`"))) => {
            let commands: Vec<&str> =
                target.validate_command.iter().chain([&target.reload_command]).map(String::as_str).collect();
            let server = addr.sudo.as_deref().unwrap_or_default();
            lines.push(CheckLine::new(
                "sudo sftp-server",
                false,
                format!(
                    "{}; a sudoers rule for this target: `{}`",
                    e.message,
                    crate::sudoers_rule(&addr.user, server, &commands)
                ),
            ));
            return lines;
        }
        Err(e) => {
            lines.push(CheckLine::new("connect", false, e.message));
            return lines;
        }
    };
    let host = crate::host::SshHost::new(pool, addr.clone()).with_policy(policy.clone());
    // Who writes the files: the SSH user, or the user sudo runs as.
    let writer = match &addr.sudo {
        None => addr.user.clone(),
        Some(server) => match host.server_ids(&lease).await {
            Ok((uid, _)) => {
                lines.push(CheckLine::new(
                    "sudo sftp-server",
                    true,
                    format!("`sudo -n {server}` runs the SFTP server as uid {uid}"),
                ));
                format!("uid {uid} (through sudo)")
            }
            Err(e) => {
                lines.push(CheckLine::new("sudo sftp-server", false, e.message));
                "the user sudo runs as".to_string()
            }
        },
    };
    let sftp = lease.sftp();
    for (name, ok, need) in [
        ("sftp posix-rename", sftp.support_posix_rename(), "required: atomic replacement"),
        ("sftp fsync", sftp.support_fsync(), "required: durable writes"),
        ("sftp hardlink", sftp.support_hardlink(), "optional: backups fall back to copies"),
    ] {
        let ext = name.trim_start_matches("sftp ");
        let detail = if ok {
            format!("{ext}@openssh.com supported")
        } else {
            format!("{addr}: the SFTP server lacks {ext}@openssh.com ({need})")
        };
        let ok = ok || name == "sftp hardlink";
        lines.push(CheckLine::new(name, ok, detail));
    }

    let mut dirs = BTreeSet::new();
    dirs.insert(parent_of(&target.cert_path));
    dirs.insert(parent_of(&target.key_path));
    if let Some(c) = &target.chain_path {
        dirs.insert(parent_of(c));
    }
    for (_, path) in extra {
        dirs.insert(parent_of(path));
    }
    for dir in dirs {
        let name = format!("directory {dir}");
        let mut fs = sftp.fs();
        match fs.metadata(Path::new(&dir)).await {
            Ok(m) if m.file_type().is_some_and(|t| t.is_dir()) => {}
            Ok(_) => {
                lines.push(CheckLine::new(name, false, format!("{addr}: {dir} is not a directory")));
                continue;
            }
            Err(e) if is_no_such_file(&e) => {
                lines.push(CheckLine::new(name, false, format!("{addr}: {dir} does not exist")));
                continue;
            }
            Err(e) => {
                lines.push(CheckLine::new(name, false, format!("{addr}: stat {dir}: {}", sftp_detail(&e))));
                continue;
            }
        }
        let probe = format!(
            "{}/.certdeploy-check.{}.{}",
            if dir == "/" { "" } else { &dir },
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        match sftp.options().write(true).create_new(true).open(Path::new(&probe)).await {
            Ok(f) => {
                let _ = f.close().await;
                match fs.remove_file(Path::new(&probe)).await {
                    Ok(()) => {
                        lines.push(CheckLine::new(name, true, format!("{dir} exists and is writable by {writer}")))
                    }
                    Err(e) => lines.push(CheckLine::new(
                        name,
                        false,
                        format!("{addr}: created {probe} but cannot remove it: {}", sftp_detail(&e)),
                    )),
                }
            }
            Err(e) => lines.push(CheckLine::new(
                name,
                false,
                format!("{addr}: {dir} is not writable by {writer}: {}", sftp_detail(&e)),
            )),
        }
    }

    // The link and owner rules, one line per configured path,
    // with the reason a deployment's snapshot would fail.
    let mut paths = vec![(Role::Cert, "cert", &target.cert_path), (Role::Key, "key", &target.key_path)];
    if let Some(c) = &target.chain_path {
        paths.push((Role::Chain, "chain", c));
    }
    let extra: Vec<(Role, String)> = extra.iter().map(|(r, p)| (*r, p.to_string())).collect();
    for (role, path) in &extra {
        paths.push((*role, role.as_str(), path));
    }
    for (role, what, path) in paths {
        let name = format!("{what} {path}");
        match host.path_rules(&lease, role, path).await {
            Ok((live, known)) => {
                let via = if &live == path { String::new() } else { format!(" (a symlink to {live}, allowed)") };
                let state = match known {
                    Some(_) => "links and owner acceptable",
                    None => "no file yet; links acceptable",
                };
                lines.push(CheckLine::new(name, true, format!("{path}{via}: {state}")));
            }
            Err(e) => lines.push(CheckLine::new(name, false, e.message)),
        }
    }

    let mut commands = Vec::new();
    if let Some(v) = &target.validate_command {
        commands.push(("validate command", v));
    }
    commands.push(("reload command", &target.reload_command));
    for (name, cmd) in commands {
        let Some(program) = cmd.split_whitespace().next() else {
            lines.push(CheckLine::new(name, false, "empty command"));
            continue;
        };
        // Under sudo the program is looked up by root's usual PATH (sudo's
        // secure_path on most systems), which the SSH user's lacks.
        let probe = match addr.sudo {
            Some(_) => format!("PATH=$PATH:{ROOT_PATH} command -v {}", shell_quote(program)),
            None => format!("command -v {}", shell_quote(program)),
        };
        match lease.exec(&probe, Duration::from_secs(30)).await {
            Ok((Some(0), out, _)) => lines.push(CheckLine::new(
                name,
                true,
                format!("`{program}` found at {}", String::from_utf8_lossy(&out).trim()),
            )),
            Ok(_) => lines.push(CheckLine::new(
                name,
                false,
                format!("{addr}: `{program}` (from `{cmd}`) not found in the PATH of {}", addr.user),
            )),
            Err(ExecFailure::TimedOut) => {
                lines.push(CheckLine::new(name, false, format!("{addr}: `{probe}` timed out")))
            }
            Err(ExecFailure::Lost(e) | ExecFailure::NoChannel(e)) => {
                lines.push(CheckLine::new(name, false, format!("{addr}: `{probe}` failed: {e}")))
            }
        }
        if addr.sudo.is_some() {
            lines.push(sudo_allows(&lease, addr, name, cmd).await);
        }
    }
    lines
}

/// The directories root's PATH holds on common systems (sudo's default
/// `secure_path`).
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether sudo lets the SSH user run `command` as a sudo target runs it,
/// asked with `sudo -n -l /bin/sh -c <command>`: sudo answers from its
/// rules (exit 0 and the command when allowed) without running anything.
async fn sudo_allows(lease: &crate::pool::Lease, addr: &HostAddr, name: &str, command: &str) -> CheckLine {
    let name = format!("sudo {name}");
    let shown = format!("/bin/sh -c {command}");
    if let Err(why) = crate::sudo_expressible(command) {
        return CheckLine::new(name, false, format!("`{command}` {why}"));
    }
    let probe = format!("sudo -n -l /bin/sh -c {} </dev/null", shell_quote(command));
    match lease.exec(&probe, Duration::from_secs(30)).await {
        Ok((Some(0), _, _)) => {
            CheckLine::new(name, true, format!("sudo lets {} run `{shown}` without a password", addr.user))
        }
        Ok((code, out, err)) => {
            let said: String =
                String::from_utf8_lossy(&[err, out].concat()).split_whitespace().collect::<Vec<_>>().join(" ");
            let said = match (said.is_empty(), code) {
                (_, Some(127)) => format!("sudo is not installed ({said})"),
                (true, _) => "no sudoers rule allows it".to_string(),
                (false, _) => said,
            };
            CheckLine::new(
                name,
                false,
                format!(
                    "{addr}: sudo -n refuses `{shown}` for {}: {said}; grant it in sudoers: `{} ALL=(root) NOPASSWD: {}`",
                    addr.user,
                    addr.user,
                    crate::sudoers_command(command)
                ),
            )
        }
        Err(ExecFailure::TimedOut) => CheckLine::new(name, false, format!("{addr}: `{probe}` timed out")),
        Err(ExecFailure::Lost(e) | ExecFailure::NoChannel(e)) => {
            CheckLine::new(name, false, format!("{addr}: `{probe}` failed: {e}"))
        }
    }
}
